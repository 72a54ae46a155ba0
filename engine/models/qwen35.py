"""qwen35 / qwen35moe: Qwen3.5 and Qwen3.6 (27B dense, 35B-A3B MoE), hybrid Gated DeltaNet + gated attention,
with the optional MTP (nextn) block. Tensor and metadata names as llama.cpp's converter writes them
(Qwen3NextModel and its Qwen3.5 subclasses); math as llama.cpp's src/models/qwen35.cpp / qwen35moe.cpp.

Per trunk layer: x += mixer(attn_norm(x)); x += ffn(post_attention_norm(x)), where the mixer is
- linear attention (Gated DeltaNet), most layers: attn_qkv -> causal conv1d (state carried) + SiLU ->
  l2-normed q, k; beta = sigmoid(ssm_beta x), g = ssm_a * softplus(ssm_alpha x + dt_bias) -> gated delta rule
  (state carried) -> rmsnorm(o) * ssm_norm * silu(attn_gate x) -> ssm_out;
- gated full attention, every full_attention_interval-th layer: attn_q projects Q and an output gate head by
  head; q/k RMSNorm, M-RoPE (at text positions the t/h/w sections see the same position, which is NeoX RoPE
  over rope.dimension_count dims; pairs on the fourth section see 0 and do not turn), causal GQA attention,
  times sigmoid(gate), attn_output;
and the FFN is SwiGLU (qwen35) or routed experts plus a sigmoid-gated shared expert (qwen35moe).

The MTP block (blk.{n_layer}.nextn.*, models/blocks.py) has one full-attention layer with the arch's FFN;
its `hidden` input is the trunk's output_norm'd final state (llama.cpp's t_h_nextn), which the trunk step
leaves on the device in buf.x for every token of the batch.
"""

from dataclasses import dataclass

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_SAVED, VAR_N_TOKENS, Launch
from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.memory.hybrid_cache import HybridCache
from nextn.memory.kv_cache import F16_KV, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.models import blocks
from nextn.models.base import Architecture, head_tensors
from nextn.models.blocks import ANY, F32, AttentionShape, MtpBuffers
from nextn.ops import delta_net, elementwise, moe, norm
from nextn.ops.weights import device_bytes, upload_weight


@dataclass(frozen=True)
class HybridHParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int  # trunk layers (block_count less the MTP block)
    n_nextn: int  # MTP blocks in the file (0 or 1)
    recurrent: tuple  # per trunk layer: True = linear attention
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float
    mrope_sections: tuple | None  # the M-RoPE sections when pairs fall on the e section (they do not turn)
    rms_eps: float
    d_conv: int
    head_k_dim: int
    n_k_heads: int
    n_v_heads: int
    head_v_dim: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    expert_weights_scale: float = 0.0

    @property
    def moe(self) -> bool:
        return self.n_expert > 0

    @property
    def conv_dim(self) -> int:
        return 2 * self.n_k_heads * self.head_k_dim + self.n_v_heads * self.head_v_dim

    @property
    def v_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim

    def linear_layers(self) -> list[int]:
        return [il for il in range(self.n_layer) if self.recurrent[il]]

    def attention_layers(self, mtp: bool = False) -> list[int]:
        """Layers with a KV cache: the trunk's full-attention layers, and the MTP block (il = n_layer)."""
        return [il for il in range(self.n_layer) if not self.recurrent[il]] + ([self.n_layer] if mtp else [])

    @classmethod
    def from_file(cls, mf: ModelFile) -> "HybridHParams":
        n_embd = mf.int_key("{arch}.embedding_length", lo=1)
        n_head = mf.int_key("{arch}.attention.head_count", lo=1)
        head_dim = mf.int_key("{arch}.attention.key_length", n_embd // n_head, lo=2)
        if mf.int_key("{arch}.attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{mf.path}: key and value head sizes differ, which nextn does not support")
        n_block = mf.int_key("{arch}.block_count", lo=1)
        n_nextn = mf.int_key("{arch}.nextn_predict_layers", 0)
        if n_nextn not in (0, 1) or n_nextn >= n_block:
            raise ModelLoadError(f"{mf.path}: {n_nextn} MTP blocks of {n_block}: nextn supports 0 or 1")
        n_layer = n_block - n_nextn
        recr = mf.key("{arch}.attention.recurrent_layers", None)
        if recr is not None:
            if len(recr) < n_layer:
                raise ModelLoadError(f"{mf.path}: attention.recurrent_layers has {len(recr)} entries for "
                                     f"{n_layer} layers")
            recurrent = tuple(bool(r) for r in recr[:n_layer])
        else:
            interval = mf.int_key("{arch}.full_attention_interval", 4)
            if interval < 1:
                raise ModelLoadError(f"{mf.path}: full_attention_interval must be positive, not {interval}")
            recurrent = tuple((il + 1) % interval != 0 for il in range(n_layer))
        n_rot = mf.int_key("{arch}.rope.dimension_count", head_dim, lo=2)
        sections = [int(s) for s in mf.key("{arch}.rope.dimension_sections", [n_rot // 2, 0, 0, 0])]
        e_pairs = _text_rope_e_pairs(mf, n_rot, sections)
        n_vocab = mf.key("{arch}.vocab_size", None)
        if n_vocab is None:
            n_vocab = len(mf.key("tokenizer.ggml.tokens"))
        scaling_type = mf.key("{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise ModelLoadError(f"{mf.path}: RoPE scaling '{scaling_type}' is not supported for {mf.arch}")
        d_inner = mf.int_key("{arch}.ssm.inner_size", lo=1)
        n_v_heads = mf.int_key("{arch}.ssm.time_step_rank")
        n_k_heads = mf.int_key("{arch}.ssm.group_count")
        if n_v_heads <= 0 or d_inner % n_v_heads or n_k_heads <= 0 or n_v_heads % n_k_heads:
            raise ModelLoadError(f"{mf.path}: ssm sizes inner {d_inner}, {n_v_heads} value heads, {n_k_heads} key "
                                 f"heads do not divide")
        moe_keys = {}
        if mf.arch == "qwen35moe":
            moe_keys = dict(
                n_expert=mf.int_key("{arch}.expert_count"),
                n_expert_used=mf.int_key("{arch}.expert_used_count"),
                n_ff_exp=mf.int_key("{arch}.expert_feed_forward_length", lo=1),
                n_ff_shexp=mf.int_key("{arch}.expert_shared_feed_forward_length", 0, lo=0),
                expert_weights_scale=mf.float_key("{arch}.expert_weights_scale", 0.0),
            )
            if not 1 <= moe_keys["n_expert_used"] <= moe_keys["n_expert"]:
                raise ModelLoadError(f"{mf.path}: expert_used_count must be in 1..expert_count")
        return cls(
            arch=mf.arch,
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=n_layer,
            n_nextn=n_nextn,
            recurrent=recurrent,
            n_head=n_head,
            n_head_kv=mf.int_key("{arch}.attention.head_count_kv", n_head, lo=1),
            head_dim=head_dim,
            n_ff=mf.int_key("{arch}.feed_forward_length", 0),
            n_ctx_train=mf.int_key("{arch}.context_length", lo=1),
            n_rot=n_rot,
            rope_freq_base=mf.float_key("{arch}.rope.freq_base", 10000.0, positive=True),
            rope_freq_scale=1.0,
            mrope_sections=tuple(sections) if e_pairs else None,
            rms_eps=mf.float_key("{arch}.attention.layer_norm_rms_epsilon", positive=True),
            d_conv=mf.int_key("{arch}.ssm.conv_kernel", lo=1),
            head_k_dim=mf.int_key("{arch}.ssm.state_size", lo=1),
            n_k_heads=n_k_heads,
            n_v_heads=n_v_heads,
            head_v_dim=d_inner // n_v_heads,
            **moe_keys,
        )


def _text_rope_e_pairs(mf: ModelFile, n_rot: int, sections: list[int]) -> bool:
    """Text tokens get M-RoPE positions [p, p, p, 0]: pairs on the t/h/w sections turn by p (NeoX RoPE), pairs
    on the fourth (e) section by 0, i.e. not at all (ggml_rope_multi, interleaved). Whether any pair is on e
    (the kernel then skips them)."""
    if len(sections) != 4 or n_rot % 2 or min(sections) < 0 or sum(sections) < 1:
        raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.dimension_sections {sections} / dimension_count "
                             f"{n_rot} malformed")
    total = sum(sections)
    return any(not any(i % total % 3 == c and i % total < 3 * sections[c] for c in range(3))
               for i in range(n_rot // 2))


# -- tensors -----------------------------------------------------------------------------------------------

def _attention(hp: HybridHParams) -> AttentionShape:
    """Gated full attention: M-RoPE at text positions is NeoX RoPE over n_rot dims."""
    return AttentionShape(hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_rot, True, hp.rope_freq_base,
                          hp.rope_freq_scale, hp.rms_eps, gated=True, mrope_sections=hp.mrope_sections)


def _linear_tensors(hp: HybridHParams, b: str) -> dict:
    e, hv = hp.n_embd, hp.n_v_heads
    return {
        b + "attn_qkv.weight": ((e, hp.conv_dim), ANY),
        b + "attn_gate.weight": ((e, hp.v_dim), ANY),
        b + "ssm_conv1d.weight": ((hp.d_conv, hp.conv_dim), F32),
        b + "ssm_dt.bias": ((hv,), F32),
        b + "ssm_a": ((hv,), F32),
        b + "ssm_beta.weight": ((e, hv), ANY),
        b + "ssm_alpha.weight": ((e, hv), ANY),
        b + "ssm_norm.weight": ((hp.head_v_dim,), F32),
        b + "ssm_out.weight": ((hp.v_dim, e), ANY),
    }


def _ffn_tensors(hp: HybridHParams, mf: ModelFile, b: str) -> dict:
    e = hp.n_embd
    if not hp.moe:
        return blocks.swiglu_tensors(e, hp.n_ff, b)
    ne, fe, fs = hp.n_expert, hp.n_ff_exp, hp.n_ff_shexp
    t = {
        b + "ffn_gate_inp.weight": ((e, ne), F32),
        b + "ffn_gate_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_up_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_down_exps.weight": ((fe, e, ne), ANY),
    }
    if fs and mf.has(b + "ffn_up_shexp.weight"):
        t[b + "ffn_gate_inp_shexp.weight"] = ((e,), F32)
        t.update(blocks.swiglu_tensors(e, fs, b, "_shexp"))
    return t


def _layer_tensors(hp: HybridHParams, mf: ModelFile, il: int) -> dict:
    e, b = hp.n_embd, f"blk.{il}."
    linear = il < hp.n_layer and hp.recurrent[il]
    return {
        b + "attn_norm.weight": ((e,), F32),
        **(_linear_tensors(hp, b) if linear else blocks.attention_tensors(_attention(hp), e, b, qk_norm=True)),
        b + "post_attention_norm.weight": ((e,), F32),
        **_ffn_tensors(hp, mf, b),
    }


# -- device weights ------------------------------------------------------------------------------------------

PLAIN_F32 = ("ssm_conv1d.weight",)  # read by kernels as plain float32 arrays, not as matmul weights
SHEXP_GATE = "ffn_gate_inp_shexp.weight"  # [n_embd] used as a 1-row matmul weight: one logit per token


# -- step buffers --------------------------------------------------------------------------------------------

def _sizes(hp: HybridHParams) -> dict[str, int]:
    """Floats per token of each activation buffer."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    s = {
        "x": hp.n_embd,
        "cur": hp.n_embd,
        "proj": max(2 * q + 2 * kv, hp.conv_dim),  # gated Q|K|V of attention layers, or the conv input/output
        "q": q,
        "kqv_out": max(q, hp.v_dim),  # attention output, or the delta rule's o
        "lin_z": hp.v_dim,
        "lin_alpha": hp.n_v_heads,
        "lin_beta": hp.n_v_heads,
    }
    if hp.moe:
        s.update(sh_gate_up=2 * hp.n_ff_shexp, sh_act=hp.n_ff_shexp, sh_y=hp.n_embd, sh_logit=1)
    else:
        s.update(gate_up=2 * hp.n_ff, act=hp.n_ff)
    return s


class StepBuffers:
    """Device buffers of one batch (see _sizes). buf.x has one row more than max_tokens, never written: the
    zero hidden state the MTP block gets for position 0."""

    def __init__(self, rt, hp: HybridHParams, max_tokens: int, max_outputs: int):
        n = max_tokens
        for name in ("ids", "pos", "seq", "out_idx"):
            setattr(self, name, rt.alloc(4 * n, f"batch.{name}"))
        for name, floats in _sizes(hp).items():
            rows = n + 1 if name == "x" else n
            setattr(self, name, rt.alloc(4 * rows * floats, f"act.{name}"))
        if hp.moe:
            self.moe = moe.MoeBuffers.allocate(rt, hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        self.iota = rt.upload(np.arange(n, dtype=np.int32), "batch.iota")  # row r -> r (saving rows)
        self.replay_idx = rt.alloc(4 * n, "batch.replay_idx")
        self.replay_seq = rt.alloc(4 * n, "batch.replay_seq")
        self.x_out = rt.alloc(4 * max_outputs * hp.n_embd, "act.x_out")
        self.logits = rt.alloc(4 * max_outputs * hp.n_vocab, "act.logits")
        self.argmax = rt.alloc(4 * max_outputs, "act.argmax")
        self.hidden = self.x  # the MTP block's input: output_norm'd final state of each row
        self.zero_row = max_tokens  # row of x that stays zero
        # zero the whole residual buffer once: rows past a batch are never read, the extra row must be 0
        cl.enqueue_fill_buffer(rt.queue, self.x, np.zeros(1, np.float32), 0, self.x.size)

    @classmethod
    def allocate(cls, rt, hp, max_tokens: int, max_outputs: int) -> "StepBuffers":
        return cls(rt, hp, max_tokens, max_outputs)

    @staticmethod
    def bytes_needed(hp: HybridHParams, max_tokens: int, max_outputs: int) -> int:
        n = max_tokens
        total = 4 * 7 * n + 4 * sum(_sizes(hp).values()) * n + 4 * hp.n_embd
        if hp.moe:
            total += moe.MoeBuffers.bytes_needed(hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        return total + 4 * max_outputs * (hp.n_embd + hp.n_vocab + 1)


# -- the step -------------------------------------------------------------------------------------------------

def _linear_attention(rt, mm, hp, w, b, buf, cache, il, n, x) -> list[Launch]:
    """x += ssm_out(gated_rms_norm(delta_rule(conv(qkv)), z)), from buf.cur; state carried per sequence."""
    hk, hv, dk, dv = hp.n_k_heads, hp.n_v_heads, hp.head_k_dim, hp.head_v_dim
    L = []
    L += mm.matmul(w[b + "attn_qkv.weight"], buf.cur, buf.proj, n, y_stride=hp.conv_dim)
    L += mm.matmul(w[b + "attn_gate.weight"], buf.cur, buf.lin_z, n)
    L += mm.matmul(w[b + "ssm_alpha.weight"], buf.cur, buf.lin_alpha, n)
    L += mm.matmul(w[b + "ssm_beta.weight"], buf.cur, buf.lin_beta, n)
    if cache.rollback_rows and n > 1:  # a step that may verify drafts: keep what a rollback replays
        L += _copy_saved(rt, hp, (buf.proj, buf.lin_alpha, buf.lin_beta), cache.saved[il], buf.iota,
                         min(n, cache.rollback_rows), VAR_N_SAVED)
    L += delta_net.ssm_conv(rt, buf.proj, buf.proj, w[b + "ssm_conv1d.weight"], cache.conv[il], buf.seq,
                            hp.conv_dim, hp.d_conv, n)
    L += delta_net.gdn_prep(rt, buf.proj, buf.lin_alpha, buf.lin_beta, w[b + "ssm_dt.bias"], w[b + "ssm_a"],
                            hk, hv, dk, dv, hp.rms_eps, n)
    L += delta_net.delta_net(rt, buf.proj, buf.lin_alpha, buf.lin_beta, cache.delta[il], buf.kqv_out, buf.seq,
                             hk, hv, dk, dv, n)
    # rmsnorm(o) * ssm_norm * silu(z), written over z
    L += delta_net.gated_rms_norm(rt, buf.kqv_out, buf.lin_z, w[b + "ssm_norm.weight"], buf.lin_z, hv, dv,
                                  hp.rms_eps, n)
    L += mm.matmul(w[b + "ssm_out.weight"], buf.lin_z, x, n, accumulate=True)
    return L


def _copy_saved(rt, hp, src, dst, idx, rows: int, token_var: int) -> list[Launch]:
    """dst[k][r] = src[k][idx[r]] for r < vars[token_var], k over (pre-conv qkv, alpha, beta)."""
    L = []
    for a, b_, width in zip(src, dst, (hp.conv_dim, hp.n_v_heads, hp.n_v_heads)):
        L += elementwise.gather_rows(rt, a, idx, b_, width, rows, token_var=token_var)
    return L


class Qwen35(Architecture):
    """qwen35 (SwiGLU FFN) and qwen35moe (routed + shared experts): the same layers, the FFN from hparams."""

    has_mtp_head = True

    def hparams(self, mf: ModelFile) -> HybridHParams:
        return HybridHParams.from_file(mf)

    def mtp_layers(self, hp: HybridHParams) -> int:
        return hp.n_nextn

    def tensor_table(self, hp: HybridHParams, mf: ModelFile, mtp: bool = False) -> dict:
        e = hp.n_embd
        t = head_tensors(hp, mf)
        for il in range(hp.n_layer):
            t.update(_layer_tensors(hp, mf, il))
        if mtp:
            b = f"blk.{hp.n_layer}."
            mtp_own = blocks.mtp_tensors(e, hp.n_vocab, b, mf)
            t.update({k: mtp_own[k] for k in list(mtp_own)[:3]})  # eh_proj, enorm, hnorm first, as the file
            t.update(_layer_tensors(hp, mf, hp.n_layer))
            t.update({k: v for k, v in mtp_own.items() if k not in t})
        return t

    def fusion_candidates(self, hp: HybridHParams, mtp: bool = False) -> list:
        out = []
        for il in range(hp.n_layer + (1 if mtp else 0)):
            b = f"blk.{il}."
            if il == hp.n_layer or not hp.recurrent[il]:
                out += blocks.qkv_fusion(b, "attn_qgkv")
            out.append(blocks.gate_up_fusion(b, "_shexp" if hp.moe else ""))
        return out

    def group_bytes(self, infos: dict, name: str, members: list[str]) -> int:
        first = infos[members[0]]
        if name.endswith(PLAIN_F32):
            return 4 * int(np.prod(first.ne))
        if name.endswith(SHEXP_GATE):
            return device_bytes(first.qtype, 1, first.ne[0])
        return super().group_bytes(infos, name, members)

    def upload_weight_group(self, rt, mf: ModelFile, infos: dict, name: str, members: list[str], out: dict) -> None:
        first = infos[members[0]]
        if name.endswith(PLAIN_F32):
            out[name] = rt.upload(np.array(mf.array_f32(first)), name)
        elif name.endswith(SHEXP_GATE):
            out[name] = upload_weight(rt, mf.raw(first).reshape(1, -1), first.qtype, 1, first.ne[0], name)
        else:
            super().upload_weight_group(rt, mf, infos, name, members, out)

    def memory_plan(self, hp: HybridHParams, infos: dict, n_seq: int, n_ctx: int, n_batch: int,
                    max_outputs: int, mtp: bool = False, rollback_rows: int = 0,
                    kv_types: KVTypes = F16_KV) -> MemoryPlan:
        trunk, mtp_w = self.weights_bytes(hp, infos, mtp)
        cache = HybridCache.bytes_needed(hp, n_seq, n_ctx, mtp, rollback_rows, kv_types)
        return MemoryPlan(
            weights=trunk,
            kv_cache=cache["kv_cache"],
            activations=StepBuffers.bytes_needed(hp, n_batch, max_outputs),
            recurrent_state=cache["recurrent_state"],
            snapshots=cache["snapshots"],
            rollback=cache["rollback"] + (4 * rollback_rows if rollback_rows else 0),
            mtp_weights=mtp_w,
            mtp_kv_cache=cache["mtp_kv_cache"],
            mtp_activations=MtpBuffers.bytes_needed(hp.n_embd, n_batch) if mtp else 0,
        )

    def make_cache(self, rt, hp: HybridHParams, n_seq: int, n_ctx: int, mtp: bool = False,
                   rollback_rows: int = 0, kv_types: KVTypes = F16_KV, n_batch: int = 0) -> HybridCache:
        return HybridCache(rt, hp, n_seq, n_ctx, mtp, rollback_rows, kv_types)

    def step_buffers(self, rt, hp: HybridHParams, max_tokens: int, max_outputs: int) -> StepBuffers:
        return StepBuffers(rt, hp, max_tokens, max_outputs)

    def mtp_buffers(self, rt, hp: HybridHParams, max_tokens: int) -> MtpBuffers:
        return MtpBuffers(rt, hp.n_embd, max_tokens)

    # -- the step -----------------------------------------------------------------------------------------

    def _ffn(self, rt, mm, hp, w, b, buf, n, x) -> list[Launch]:
        """x += ffn(buf.cur): SwiGLU, or routed experts + sigmoid-gated shared expert."""
        if not hp.moe:
            return blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, x, hp.n_ff, n)
        L = blocks.moe_ffn(rt, mm, w, b, buf.cur, x, hp.n_expert, hp.n_expert_used, hp.expert_weights_scale,
                           buf.moe, n)
        if b + "ffn_down_shexp.weight" in w:
            L += blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.sh_gate_up, buf.sh_act, buf.sh_y, hp.n_ff_shexp, n,
                                   "_shexp", accumulate=False)
            L += mm.matmul(w[b + "ffn_gate_inp_shexp.weight"], buf.cur, buf.sh_logit, n)
            L += moe.shared_expert_add(rt, buf.sh_y, buf.sh_logit, x, hp.n_embd, n)
        return L

    def _layer(self, rt, mm, hp, w, il, buf, cache, n, x) -> list[Launch]:
        """One block over residual stream x (buf.x for the trunk, the MTP buffers' x for the MTP block)."""
        b = f"blk.{il}."
        L = norm.rms_norm(rt, x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
        if il < hp.n_layer and hp.recurrent[il]:
            L += _linear_attention(rt, mm, hp, w, b, buf, cache, il, n, x)
        else:
            L += blocks.attention(rt, mm, _attention(hp), w, b, buf.cur, buf.proj, buf.q, buf.kqv_out, x, cache,
                                  il, buf.pos, buf.seq, n, fused="attn_qgkv")
        L += norm.rms_norm(rt, x, buf.cur, w[b + "post_attention_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
        L += self._ffn(rt, mm, hp, w, b, buf, n, x)
        return L

    def build_step(self, rt, mm, hp: HybridHParams, w: dict, buf: StepBuffers, cache: HybridCache,
                   max_tokens: int, max_outputs: int) -> list[Launch]:
        """Leaves the output_norm'd hidden state of every token in buf.x (the MTP block's input)."""
        n = max_tokens
        L = mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)
        for il in range(hp.n_layer):
            L += self._layer(rt, mm, hp, w, il, buf, cache, n, buf.x)
        L += norm.rms_norm(rt, buf.x, buf.x, w["output_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # h_nextn
        L += blocks.output_head(rt, mm, w["output.weight"], buf.x, buf.out_idx, buf.x_out, buf.logits, buf.argmax,
                                hp.n_embd, hp.n_vocab, max_outputs, n)
        return L

    def build_mtp_step(self, rt, mm, hp: HybridHParams, w: dict, buf: StepBuffers, mbuf: MtpBuffers,
                       cache: HybridCache, max_tokens: int, max_outputs: int, hidden_src) -> list[Launch]:
        il = hp.n_layer
        return blocks.mtp_step(rt, mm, w, f"blk.{il}.", hp.n_embd, hp.rms_eps, buf, mbuf, hidden_src,
                               max_tokens, max_outputs,
                               lambda view, x: self._layer(rt, mm, hp, w, il, view, cache, max_tokens, x))

    def build_replay(self, rt, hp: HybridHParams, w: dict, buf: StepBuffers, cache: HybridCache) -> list[Launch]:
        """Rollback replay: the saved rows buf.replay_idx[:n] of the last step, all of sequence buf.replay_seq,
        through each linear layer's conv and delta rule only, from the state restored before it."""
        n, hk, hv, dk, dv = cache.rollback_rows, hp.n_k_heads, hp.n_v_heads, hp.head_k_dim, hp.head_v_dim
        L = []
        for il in hp.linear_layers():
            b = f"blk.{il}."
            L += _copy_saved(rt, hp, cache.saved[il], (buf.proj, buf.lin_alpha, buf.lin_beta), buf.replay_idx, n,
                             VAR_N_TOKENS)
            L += delta_net.ssm_conv(rt, buf.proj, buf.proj, w[b + "ssm_conv1d.weight"], cache.conv[il],
                                    buf.replay_seq, hp.conv_dim, hp.d_conv, n)
            L += delta_net.gdn_prep(rt, buf.proj, buf.lin_alpha, buf.lin_beta, w[b + "ssm_dt.bias"],
                                    w[b + "ssm_a"], hk, hv, dk, dv, hp.rms_eps, n)
            L += delta_net.delta_net(rt, buf.proj, buf.lin_alpha, buf.lin_beta, cache.delta[il], buf.kqv_out,
                                     buf.replay_seq, hk, hv, dk, dv, n)
        return L


ARCH = Qwen35("qwen35")
ARCH_MOE = Qwen35("qwen35moe")
