"""glm4moe: GLM-4.5, GLM-4.5-Air, GLM-4.6 and GLM-4.7, with the optional MTP (NextN) block. Tensor and metadata
names as llama.cpp's converter writes them (conversion/glm.py, Glm4MoeModel); math as llama.cpp's
src/models/glm4-moe.cpp.

Per trunk layer: x += attn_output(attention(rope(norm?(q + bq)), rope(norm?(k + bk)), v + bv)) from
attn_norm(x); x += ffn(post_attention_norm(x)), where
- attention: q/k/v with biases, q/k RMSNorm when the file has them (GLM-4.5 355B), NeoX RoPE over
  rope.dimension_count dims (half of each head: partial_rotary_factor 0.5), causal GQA attention;
- the FFN of the first leading_dense_block_count layers is SwiGLU; of the others, routed experts chosen by
  sigmoid(router logit) + exp_probs_b (the selection bias), weighted by the sigmoid probabilities
  (normalized when expert_weights_norm) times expert_weights_scale, plus an ungated SwiGLU shared expert.

The MTP block (blk.{n_layer}.*, models/blocks.py) has one layer of the MoE kind; its hidden input is the
trunk's output_norm'd final state, which the trunk step leaves in buf.x for every token of the batch.
"""

from dataclasses import dataclass

import numpy as np
import pyopencl as cl

from nextn.cl.launch import Launch
from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVCache, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.models import blocks
from nextn.models.base import Architecture, head_tensors
from nextn.models.blocks import ANY, F32, AttentionShape, MtpBuffers
from nextn.ops import moe, norm

GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values


@dataclass(frozen=True)
class Glm4MoeHParams:
    n_vocab: int
    n_embd: int
    n_layer: int  # trunk layers (block_count less the MTP blocks)
    n_nextn: int  # MTP blocks the file declares (0 or 1)
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # the leading dense layers' FFN
    n_ctx_train: int
    n_rot: int
    rope_freq_base: float
    rms_eps: float
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_expert_shared: int
    n_dense_lead: int
    expert_weights_scale: float
    expert_weights_norm: bool
    gating: str
    qk_norm: bool
    qkv_bias: bool

    @property
    def n_ff_shexp(self) -> int:
        return self.n_ff_exp * self.n_expert_shared

    def is_moe(self, il: int) -> bool:
        return il >= self.n_dense_lead

    @classmethod
    def from_file(cls, mf: ModelFile) -> "Glm4MoeHParams":
        def positive(key: str, default=...) -> int:
            return mf.int_key("{arch}." + key, default, lo=1)

        n_embd = positive("embedding_length")
        n_head = positive("attention.head_count")
        head_dim = positive("attention.key_length", n_embd // n_head)
        if mf.int_key("{arch}.attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{mf.path}: key and value head sizes differ, which nextn does not support")
        n_block = positive("block_count")
        n_nextn = mf.int_key("{arch}.nextn_predict_layers", 0)
        if n_nextn not in (0, 1) or n_nextn >= n_block:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.nextn_predict_layers = {n_nextn} of {n_block} blocks: "
                                 f"nextn supports 0 or 1")
        n_rot = mf.int_key("{arch}.rope.dimension_count", head_dim)
        if n_rot < 2 or n_rot % 2 or n_rot > head_dim:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.dimension_count = {n_rot} must be even and in "
                                 f"2..{head_dim}")
        sections = mf.key("{arch}.rope.dimension_sections", None)
        if sections is not None and any(int(s) for s in sections):
            raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.dimension_sections (M-RoPE, the vision variant) is "
                                 f"not supported")
        scaling_type = mf.key("{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.scaling.type '{scaling_type}' is not supported")
        gating_key = mf.int_key("{arch}.expert_gating_func", 2)
        if gating_key not in GATING:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.expert_gating_func = {gating_key} is not supported "
                                 f"(1 softmax, 2 sigmoid)")
        n_expert = positive("expert_count")
        n_used = positive("expert_used_count")
        if n_used > n_expert:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.expert_used_count {n_used} exceeds expert_count {n_expert}")
        n_layer = n_block - n_nextn
        n_dense_lead = mf.int_key("{arch}.leading_dense_block_count", 0)
        if not 0 <= n_dense_lead <= n_layer:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.leading_dense_block_count = {n_dense_lead} is outside "
                                 f"0..{n_layer}")
        n_vocab = mf.key("{arch}.vocab_size", None)
        if n_vocab is None:
            n_vocab = len(mf.key("tokenizer.ggml.tokens"))
        eps = mf.float_key("{arch}.attention.layer_norm_rms_epsilon", positive=True)
        base = mf.float_key("{arch}.rope.freq_base", 10000.0, positive=True)
        return cls(
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=n_layer,
            n_nextn=n_nextn,
            n_head=n_head,
            n_head_kv=positive("attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_ff=mf.int_key("{arch}.feed_forward_length", 0) if n_dense_lead else 0,
            n_ctx_train=positive("context_length"),
            n_rot=n_rot,
            rope_freq_base=base,
            rms_eps=eps,
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=positive("expert_feed_forward_length"),
            n_expert_shared=mf.int_key("{arch}.expert_shared_count", 0),
            n_dense_lead=n_dense_lead,
            expert_weights_scale=mf.float_key("{arch}.expert_weights_scale", 0.0),
            expert_weights_norm=bool(mf.key("{arch}.expert_weights_norm", False)),
            gating=GATING[gating_key],
            qk_norm=mf.has("blk.0.attn_q_norm.weight"),
            qkv_bias=blocks.has_qkv_biases(mf, "blk.0."),
        )


def _attention(hp: Glm4MoeHParams) -> AttentionShape:
    return AttentionShape(hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_rot, True, hp.rope_freq_base, 1.0, hp.rms_eps)


def _layer_tensors(hp: Glm4MoeHParams, il: int) -> dict:
    e, b = hp.n_embd, f"blk.{il}."
    t = {
        b + "attn_norm.weight": ((e,), F32),
        **blocks.attention_tensors(_attention(hp), e, b, hp.qk_norm, hp.qkv_bias),
        b + "post_attention_norm.weight": ((e,), F32),
    }
    if not hp.is_moe(il):
        t.update(blocks.swiglu_tensors(e, hp.n_ff, b))
        return t
    ne, fe = hp.n_expert, hp.n_ff_exp
    t.update({
        b + "ffn_gate_inp.weight": ((e, ne), ANY),
        b + "exp_probs_b.bias": ((ne,), F32),
        b + "ffn_gate_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_up_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_down_exps.weight": ((fe, e, ne), ANY),
    })
    if hp.n_expert_shared:
        t.update(blocks.swiglu_tensors(e, hp.n_ff_shexp, b, "_shexp"))
    return t


class StepBuffers:
    """Device buffers of one batch. x has one row more than max_tokens, never written: the zero hidden state
    the MTP block gets for position 0. gate_up / act serve the dense FFN and the shared expert."""

    def __init__(self, rt, hp: Glm4MoeHParams, max_tokens: int, max_outputs: int):
        n = max_tokens
        for name in ("ids", "pos", "seq", "out_idx"):
            setattr(self, name, rt.alloc(4 * n, f"batch.{name}"))
        for name, floats in self.sizes(hp).items():
            rows = n + 1 if name == "x" else n
            setattr(self, name, rt.alloc(4 * rows * floats, f"act.{name}"))
        self.moe = moe.MoeBuffers.allocate(rt, hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        self.x_out = rt.alloc(4 * max_outputs * hp.n_embd, "act.x_out")
        self.logits = rt.alloc(4 * max_outputs * hp.n_vocab, "act.logits")
        self.argmax = rt.alloc(4 * max_outputs, "act.argmax")
        self.hidden = self.x  # the MTP block's input: output_norm'd final state of each row
        self.zero_row = max_tokens
        cl.enqueue_fill_buffer(rt.queue, self.x, np.zeros(1, np.float32), 0, self.x.size)

    @staticmethod
    def sizes(hp: Glm4MoeHParams) -> dict[str, int]:
        """Floats per token of each activation buffer."""
        a = _attention(hp)
        ff = max(hp.n_ff, hp.n_ff_shexp, 1)
        return {"x": hp.n_embd, "cur": hp.n_embd, "proj": a.row, "q": hp.n_head * hp.head_dim,
                "kqv_out": hp.n_head * hp.head_dim, "gate_up": 2 * ff, "act": ff}

    @classmethod
    def bytes_needed(cls, hp: Glm4MoeHParams, max_tokens: int, max_outputs: int) -> int:
        n = max_tokens
        total = 4 * 4 * n + 4 * sum(cls.sizes(hp).values()) * n + 4 * hp.n_embd
        total += moe.MoeBuffers.bytes_needed(hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        return total + 4 * max_outputs * (hp.n_embd + hp.n_vocab + 1)


class Glm4Moe(Architecture):
    has_mtp_head = True

    def hparams(self, mf: ModelFile) -> Glm4MoeHParams:
        return Glm4MoeHParams.from_file(mf)

    def mtp_layers(self, hp: Glm4MoeHParams) -> int:
        return hp.n_nextn

    def tensor_table(self, hp: Glm4MoeHParams, mf: ModelFile, mtp: bool = False) -> dict:
        e = hp.n_embd
        t = head_tensors(hp, mf)
        for il in range(hp.n_layer):
            t.update(_layer_tensors(hp, il))
        if mtp:
            b = f"blk.{hp.n_layer}."
            t.update(blocks.mtp_tensors(e, hp.n_vocab, b, mf))
            t.update(_layer_tensors(hp, hp.n_layer))
        return t

    def fusion_candidates(self, hp: Glm4MoeHParams, mtp: bool = False) -> list:
        out = []
        for il in range(hp.n_layer + (1 if mtp else 0)):
            b = f"blk.{il}."
            out += blocks.qkv_fusion(b)
            out.append(blocks.gate_up_fusion(b, "_shexp" if hp.is_moe(il) else ""))
        return out

    def memory_plan(self, hp: Glm4MoeHParams, infos: dict, n_seq: int, n_ctx: int, n_batch: int,
                    max_outputs: int, mtp: bool = False, rollback_rows: int = 0,
                    kv_types: KVTypes = F16_KV) -> MemoryPlan:
        trunk, mtp_w = self.weights_bytes(hp, infos, mtp)
        kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(hp.n_layer))
        mtp_kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(0, True))
        return MemoryPlan(
            weights=trunk,
            kv_cache=kv,
            activations=StepBuffers.bytes_needed(hp, n_batch, max_outputs),
            mtp_weights=mtp_w,
            mtp_kv_cache=mtp_kv if mtp else 0,
            mtp_activations=MtpBuffers.bytes_needed(hp.n_embd, n_batch) if mtp else 0,
        )

    def make_cache(self, rt, hp: Glm4MoeHParams, n_seq: int, n_ctx: int, mtp: bool = False,
                   rollback_rows: int = 0, kv_types: KVTypes = F16_KV, n_batch: int = 0) -> KVCache:
        # the MTP block's KV is layer n_layer; rejected drafts roll back by the lengths alone
        return KVCache(rt, n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(hp.n_layer, mtp))

    def step_buffers(self, rt, hp: Glm4MoeHParams, max_tokens: int, max_outputs: int) -> StepBuffers:
        return StepBuffers(rt, hp, max_tokens, max_outputs)

    def mtp_buffers(self, rt, hp: Glm4MoeHParams, max_tokens: int) -> MtpBuffers:
        return MtpBuffers(rt, hp.n_embd, max_tokens)

    # -- the step -----------------------------------------------------------------------------------------

    def _layer(self, rt, mm, hp, w, il, buf, cache, n, x) -> list[Launch]:
        """One block over residual stream x (buf.x for the trunk, the MTP buffers' x for the MTP block)."""
        b = f"blk.{il}."
        L = norm.rms_norm(rt, x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
        L += blocks.attention(rt, mm, _attention(hp), w, b, buf.cur, buf.proj, buf.q, buf.kqv_out, x, cache, il,
                              buf.pos, buf.seq, n)
        L += norm.rms_norm(rt, x, buf.cur, w[b + "post_attention_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
        if not hp.is_moe(il):
            return L + blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, x, hp.n_ff, n)
        L += moe.moe_ffn(rt, mm, buf.cur, x, w[b + "ffn_gate_inp.weight"], w[b + "ffn_gate_exps.weight"],
                         w[b + "ffn_up_exps.weight"], w[b + "ffn_down_exps.weight"], hp.n_expert, hp.n_expert_used,
                         hp.expert_weights_scale, buf.moe, n, gating=hp.gating,
                         selection_bias=w[b + "exp_probs_b.bias"], norm=hp.expert_weights_norm)
        if hp.n_expert_shared:  # the shared expert, ungated
            L += blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, x, hp.n_ff_shexp, n, "_shexp")
        return L

    def build_step(self, rt, mm, hp: Glm4MoeHParams, w: dict, buf: StepBuffers, cache: KVCache, max_tokens: int,
                   max_outputs: int) -> list[Launch]:
        """Leaves the output_norm'd hidden state of every token in buf.x (the MTP block's input)."""
        n = max_tokens
        L = mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)
        for il in range(hp.n_layer):
            L += self._layer(rt, mm, hp, w, il, buf, cache, n, buf.x)
        L += norm.rms_norm(rt, buf.x, buf.x, w["output_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # h_nextn
        L += blocks.output_head(rt, mm, w["output.weight"], buf.x, buf.out_idx, buf.x_out, buf.logits, buf.argmax,
                                hp.n_embd, hp.n_vocab, max_outputs, n)
        return L

    def build_mtp_step(self, rt, mm, hp: Glm4MoeHParams, w: dict, buf: StepBuffers, mbuf: MtpBuffers,
                       cache: KVCache, max_tokens: int, max_outputs: int, hidden_src) -> list[Launch]:
        il = hp.n_layer
        return blocks.mtp_step(rt, mm, w, f"blk.{il}.", hp.n_embd, hp.rms_eps, buf, mbuf, hidden_src,
                               max_tokens, max_outputs,
                               lambda view, x: self._layer(rt, mm, hp, w, il, view, cache, max_tokens, x))


ARCH = Glm4Moe("glm4moe")
