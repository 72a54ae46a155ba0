"""step35: Step-3.5 (Step-3.5-Flash), with its chained MTP (NextN) blocks. Tensor and metadata names as
llama.cpp's converter writes them (conversion/step3.py, Step35Model); math as llama.cpp's src/models/step35.cpp
(graph, graph_mtp, load_arch_hparams) and common/speculative.cpp (the chain_heads draft loop).

Per layer il (trunk 0..n_layer-1, then the MTP blocks): x += attn_output(gate * attention(...)) from
attn_norm(x); x += ffn(ffn_norm(x)), where
- attention has the layer's own head counts (head_count / head_count_kv arrays), q/k RMSNorm when the file
  has them, NeoX RoPE over n_rot(il) dims with base freq_base(il): a sliding layer
  (attention.sliding_window_pattern[il]) rotates rope.dimension_count_swa dims (default
  rope.dimension_count, default head_dim) at rope.freq_base_swa (default 10000, as llama.cpp), and sees the
  last attention.sliding_window positions only; a full layer rotates half of rope.dimension_count at
  rope.freq_base, its angles divided by rope_freqs.weight when the file has it (Llama-3 scaling);
- the optional head-wise gate: each head's output times sigmoid(attn_gate x) (Step-3.5's g_proj);
- the FFN is SwiGLU where the layer has no ffn_gate_inp (the leading dense layers), else routed experts
  chosen by sigmoid(router logit) + exp_probs_b, weighted by the sigmoid probabilities (normalized when
  expert_weights_norm) times expert_weights_scale, plus an ungated SwiGLU shared expert; both SwiGLUs are
  clamped where swiglu_clamp_exp / swiglu_clamp_shexp[il] > 0 (the shexp limit also clamps a dense FFN,
  as llama.cpp's build_ffn does).

The MTP blocks (blk.{n_layer + k}, k < nextn_predict_layers) are each a full decoder layer of that kind with
NextN wiring (models/blocks.py): their hidden input is the trunk's final state *before* output_norm (and a
block's own output before shared_head_norm), and they draft in a chain: block k drafts the (k+1)-th token
(spec/mtp.py). Sliding layers' KV is a ring of window + n_batch - 1 rows per sequence (memory/kv_cache.py).
"""

from dataclasses import dataclass
from math import gcd

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVCache, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.models import blocks
from nextn.models.base import Architecture, head_tensors
from nextn.models.blocks import ANY, F32, AttentionShape, MtpBuffers, MtpView
from nextn.ops import elementwise, moe, norm
from nextn.ops.attention import ring_rows

SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID, step35's default


@dataclass(frozen=True)
class Step35HParams:
    n_vocab: int
    n_embd: int
    n_layer: int  # trunk layers (block_count less the MTP blocks)
    n_nextn: int  # MTP blocks the file declares
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    n_swa: int  # the sliding window
    # per layer, all block_count of them (trunk, then MTP blocks)
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    swa: tuple[bool, ...]
    moe: tuple[bool, ...]  # routed experts (the file has ffn_gate_inp), else a dense SwiGLU
    n_ff: tuple[int, ...]
    clamp_exp: tuple[float, ...]
    clamp_shexp: tuple[float, ...]
    qk_norm: tuple[bool, ...]
    head_gate: tuple[bool, ...]
    n_rot_full: int
    n_rot_swa: int
    freq_base: float
    freq_base_swa: float
    freq_scale: float
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    expert_weights_scale: float
    expert_weights_norm: bool

    def n_rot(self, il: int) -> int:
        return self.n_rot_swa if self.swa[il] else self.n_rot_full

    def window(self, il: int) -> int:
        return self.n_swa if self.swa[il] else 0

    @property
    def max_head(self) -> int:
        return max(self.n_head)

    @classmethod
    def from_file(cls, mf: ModelFile) -> "Step35HParams":
        def positive(key: str, default=...) -> int:
            return mf.int_key("{arch}." + key, default, lo=1)

        n_block = positive("block_count")
        n_nextn = mf.int_key("{arch}.nextn_predict_layers", 0, lo=0)
        if n_nextn >= n_block:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.nextn_predict_layers = {n_nextn} leaves no trunk layer of "
                                 f"{n_block} blocks")
        n_layer = n_block - n_nextn
        n_embd = positive("embedding_length")
        n_head = _per_layer(mf, "attention.head_count", n_block, lo=1)
        n_head_kv = _per_layer(mf, "attention.head_count_kv", n_block, n_head, lo=1)
        for il in range(n_block):
            if n_head[il] % n_head_kv[il]:
                raise ModelLoadError(f"{mf.path}: {mf.arch}.attention.head_count {n_head[il]} of layer {il} is not "
                                     f"a multiple of attention.head_count_kv {n_head_kv[il]}")
        head_dim = positive("attention.key_length", n_embd // n_head[0])
        if mf.int_key("{arch}.attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.attention.value_length differs from key_length, which "
                                 f"nextn does not support")
        if head_dim % 4:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.attention.key_length = {head_dim} must be a multiple of 4")
        pattern = mf.key("{arch}.attention.sliding_window_pattern")
        if not isinstance(pattern, list) or len(pattern) != n_block:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.attention.sliding_window_pattern must be an array of "
                                 f"{n_block} booleans (one per block)")
        swa = tuple(bool(v) for v in pattern)
        n_swa = positive("attention.sliding_window")
        # llama.cpp: n_rot_full = rope.dimension_count (default head_dim), halved for full layers; the sliding
        # layers' rope.dimension_count_swa defaults to the unhalved value
        n_rot = positive("rope.dimension_count", head_dim)
        n_rot_full, n_rot_swa = n_rot // 2, positive("rope.dimension_count_swa", n_rot)
        for key, r in (("rope.dimension_count", n_rot_full), ("rope.dimension_count_swa", n_rot_swa)):
            if r < 2 or r % 2 or r > head_dim:
                raise ModelLoadError(f"{mf.path}: {mf.arch}.{key} gives {r} rotated dims, which must be even and in "
                                     f"2..{head_dim}")
        scaling_type = mf.key("{arch}.rope.scaling.type", "none")
        freq_scale = 1.0
        if scaling_type == "linear":
            freq_scale = 1.0 / mf.float_key("{arch}.rope.scaling.factor", 1.0, positive=True)
        elif scaling_type not in ("none", None):
            raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.scaling.type '{scaling_type}' is not supported "
                                 f"(none and linear are; Llama-3 scaling comes as rope_freqs.weight)")
        gating = mf.int_key("{arch}.expert_gating_func", SIGMOID)
        if gating not in (0, SIGMOID):  # 0: not set, which llama.cpp reads as sigmoid
            raise ModelLoadError(f"{mf.path}: {mf.arch}.expert_gating_func = {gating} is not supported "
                                 f"(step35 routes by sigmoid, 2)")
        moe_layers = tuple(mf.has(f"blk.{il}.ffn_gate_inp.weight") for il in range(n_block))
        n_expert = n_used = n_ff_exp = n_ff_shexp = 0
        if any(moe_layers):
            n_expert = positive("expert_count")
            n_used = positive("expert_used_count")
            if n_used > n_expert:
                raise ModelLoadError(f"{mf.path}: {mf.arch}.expert_used_count {n_used} exceeds expert_count "
                                     f"{n_expert}")
            ff_exp = set(_per_layer(mf, "expert_feed_forward_length", n_block, lo=1))
            if len(ff_exp) != 1:
                raise ModelLoadError(f"{mf.path}: {mf.arch}.expert_feed_forward_length differs between layers, "
                                     f"which nextn does not support")
            n_ff_exp = ff_exp.pop()
            n_ff_shexp = positive("expert_shared_feed_forward_length")  # step35 adds a shared expert always
        dense = [il for il in range(n_block) if not moe_layers[il]]
        n_ff = _per_layer(mf, "feed_forward_length", n_block, lo=1) if dense else (0,) * n_block
        n_vocab = mf.key("{arch}.vocab_size", None)
        if n_vocab is None:
            n_vocab = len(mf.key("tokenizer.ggml.tokens"))
        return cls(
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=n_layer,
            n_nextn=n_nextn,
            head_dim=head_dim,
            n_ctx_train=positive("context_length"),
            rms_eps=mf.float_key("{arch}.attention.layer_norm_rms_epsilon", positive=True),
            n_swa=n_swa,
            n_head=n_head,
            n_head_kv=n_head_kv,
            swa=swa,
            moe=moe_layers,
            n_ff=n_ff,
            clamp_exp=_per_layer(mf, "swiglu_clamp_exp", n_block, 0.0, number=float),
            clamp_shexp=_per_layer(mf, "swiglu_clamp_shexp", n_block, 0.0, number=float),
            qk_norm=tuple(mf.has(f"blk.{il}.attn_q_norm.weight") for il in range(n_block)),
            head_gate=tuple(mf.has(f"blk.{il}.attn_gate.weight") for il in range(n_block)),
            n_rot_full=n_rot_full,
            n_rot_swa=n_rot_swa,
            freq_base=mf.float_key("{arch}.rope.freq_base", 10000.0, positive=True),
            freq_base_swa=mf.float_key("{arch}.rope.freq_base_swa", 10000.0, positive=True),
            freq_scale=freq_scale,
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=n_ff_exp,
            n_ff_shexp=n_ff_shexp,
            expert_weights_scale=mf.float_key("{arch}.expert_weights_scale", 0.0),
            expert_weights_norm=bool(mf.key("{arch}.expert_weights_norm", False)),
        )


def _per_layer(mf: ModelFile, key: str, n: int, default=..., *, lo: float | None = None, number=int) -> tuple:
    """{arch}.key as one value per layer: an array of n values, or one value for all (llama.cpp's
    get_key_or_arr). default: a value or a per-layer tuple."""
    full = f"{mf.arch}.{key}"
    v = mf.key("{arch}." + key, default)
    values = list(v) if isinstance(v, (list, tuple)) else [v] * n
    if len(values) != n:
        raise ModelLoadError(f"{mf.path}: metadata key {full} has {len(values)} values, expected {n} (one per block)")
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x) or (
                number is int and float(x) != int(x)):
            raise ModelLoadError(f"{mf.path}: metadata key {full} = {v!r} is not {'an integer' if number is int else 'a number'}")
        if lo is not None and x < lo:
            raise ModelLoadError(f"{mf.path}: metadata key {full} = {v!r} must be at least {lo}")
        out.append(number(x))
    return tuple(out)


def _attention(hp: Step35HParams, il: int) -> AttentionShape:
    swa = hp.swa[il]
    return AttentionShape(hp.n_head[il], hp.n_head_kv[il], hp.head_dim, hp.n_rot(il), True,
                          hp.freq_base_swa if swa else hp.freq_base, 1.0 if swa else hp.freq_scale, hp.rms_eps,
                          freq_factors=not swa)


def _layer_tensors(hp: Step35HParams, il: int) -> dict:
    e, b = hp.n_embd, f"blk.{il}."
    t = {
        b + "attn_norm.weight": ((e,), F32),
        **blocks.attention_tensors(_attention(hp, il), e, b, hp.qk_norm[il]),
        b + "ffn_norm.weight": ((e,), F32),
    }
    if hp.head_gate[il]:
        t[b + "attn_gate.weight"] = ((e, hp.n_head[il]), ANY)
    if not hp.moe[il]:
        t.update(blocks.swiglu_tensors(e, hp.n_ff[il], b))
        return t
    ne, fe = hp.n_expert, hp.n_ff_exp
    t.update({
        b + "ffn_gate_inp.weight": ((e, ne), ANY),
        b + "exp_probs_b.bias": ((ne,), F32),
        b + "ffn_gate_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_up_exps.weight": ((e, fe, ne), ANY),
        b + "ffn_down_exps.weight": ((fe, e, ne), ANY),
    })
    t.update(blocks.swiglu_tensors(e, hp.n_ff_shexp, b, "_shexp"))
    return t


def _kv_layers(hp: Step35HParams, n_ctx: int, n_batch: int, mtp: bool) -> dict:
    """KVCache's per-layer keyword lists: the trunk's layers, then the MTP blocks' when mtp."""
    layers = range(hp.n_layer + (hp.n_nextn if mtp else 0))
    return {"layer_heads": [hp.n_head_kv[il] for il in layers],
            "layer_rows": [ring_rows(hp.n_swa, max(1, n_batch), n_ctx) if hp.swa[il] else n_ctx for il in layers],
            "layer_window": [hp.window(il) for il in layers]}


class StepBuffers:
    """Device buffers of one batch. x has one row more than max_tokens, never written: the zero hidden state
    the MTP blocks get for position 0. x is left *before* output_norm (the MTP blocks' input). gate_up / act
    serve the dense FFN and the shared expert; gate the head-wise attention gate's logits."""

    def __init__(self, rt, hp: Step35HParams, max_tokens: int, max_outputs: int):
        n = max_tokens
        for name in ("ids", "pos", "seq", "out_idx"):
            setattr(self, name, rt.alloc(4 * n, f"batch.{name}"))
        for name, floats in self.sizes(hp).items():
            rows = n + 1 if name == "x" else n
            setattr(self, name, rt.alloc(4 * rows * floats, f"act.{name}"))
        self.moe = None
        if any(hp.moe):
            self.moe = moe.MoeBuffers.allocate(rt, hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        self.x_out = rt.alloc(4 * max_outputs * hp.n_embd, "act.x_out")
        self.logits = rt.alloc(4 * max_outputs * hp.n_vocab, "act.logits")
        self.argmax = rt.alloc(4 * max_outputs, "act.argmax")
        self.hidden = self.x
        self.zero_row = max_tokens
        cl.enqueue_fill_buffer(rt.queue, self.x, np.zeros(1, np.float32), 0, self.x.size)

    @staticmethod
    def sizes(hp: Step35HParams) -> dict[str, int]:
        """Floats per token of each activation buffer (the largest layer's)."""
        layers = range(len(hp.n_head))
        row = max(_attention(hp, il).row for il in layers)
        ff = max(max(hp.n_ff), hp.n_ff_shexp, 1)
        return {"x": hp.n_embd, "cur": hp.n_embd, "proj": row, "q": hp.max_head * hp.head_dim,
                "kqv_out": hp.max_head * hp.head_dim, "gate": hp.max_head, "gate_up": 2 * ff, "act": ff}

    @classmethod
    def bytes_needed(cls, hp: Step35HParams, max_tokens: int, max_outputs: int) -> int:
        n = max_tokens
        total = 4 * 4 * n + 4 * sum(cls.sizes(hp).values()) * n + 4 * hp.n_embd
        if any(hp.moe):
            total += moe.MoeBuffers.bytes_needed(hp.n_embd, hp.n_ff_exp, hp.n_expert, hp.n_expert_used, n)
        return total + 4 * max_outputs * (hp.n_embd + hp.n_vocab + 1)


ALIGN = 4096  # bytes: each MTP block's rows of the hidden pool start at a sub-buffer origin every device takes


class ChainBuffers(MtpBuffers):
    """The MTP blocks' inputs and their residual streams: one pool h of n_heads regions of head_rows rows,
    region k block k's residual stream x (a sub-buffer), so a chained draft can pair each token with the
    output (before shared_head_norm) of the block that drafted it. Row max_tokens of region 0 stays zero."""

    def __init__(self, rt, n_embd: int, max_tokens: int, n_heads: int):
        n = max_tokens
        for name in ("ids", "pos", "seq", "out_idx", "hid_idx"):
            setattr(self, name, rt.alloc(4 * n, f"mtp.{name}"))
        self.hn = rt.alloc(4 * n * n_embd, "mtp.hn")
        if rt.device.mem_base_addr_align // 8 > ALIGN:
            raise ModelLoadError(f"the device aligns sub-buffers to {rt.device.mem_base_addr_align // 8} bytes")
        self.head_rows = self.rows(n_embd, n)
        region = 4 * n_embd * self.head_rows
        self.h = rt.alloc(region * n_heads, "mtp.h")
        cl.enqueue_fill_buffer(rt.queue, self.h, np.zeros(1, np.float32), 0, self.h.size)
        self.xs = [self.h.get_sub_region(k * region, region) for k in range(n_heads)]

    @staticmethod
    def rows(n_embd: int, max_tokens: int) -> int:
        step = ALIGN // gcd(ALIGN, 4 * n_embd)
        return -(-(max_tokens + 1) // step) * step

    @classmethod
    def bytes_needed(cls, n_embd: int, max_tokens: int, n_heads: int = 1) -> int:
        return 4 * 5 * max_tokens + 4 * n_embd * (max_tokens + n_heads * cls.rows(n_embd, max_tokens))


class Step35(Architecture):
    has_mtp_head = True

    def hparams(self, mf: ModelFile) -> Step35HParams:
        return Step35HParams.from_file(mf)

    def mtp_layers(self, hp: Step35HParams) -> int:
        return hp.n_nextn

    def mtp_draft_heads(self, hp: Step35HParams) -> int:
        return hp.n_nextn

    def mtp_tensor_names(self, hp: Step35HParams, infos: dict) -> list[str]:
        prefixes = tuple(f"blk.{il}." for il in range(hp.n_layer, hp.n_layer + hp.n_nextn))
        return [n for n in infos if n.startswith(prefixes)] if prefixes else []

    def tensor_table(self, hp: Step35HParams, mf: ModelFile, mtp: bool = False) -> dict:
        if mf.has("blk.0.attn_qkv.weight"):
            raise ModelLoadError(f"{mf.path}: fused attn_qkv tensors are not supported for {mf.arch}")
        t = head_tensors(hp, mf)
        if mf.has("rope_freqs.weight"):  # Llama-3 factors of the full layers (the first n_rot_full/2 used)
            t["rope_freqs.weight"] = ((max(hp.n_rot_full, hp.n_rot_swa) // 2,), F32)
        for il in range(hp.n_layer):
            t.update(_layer_tensors(hp, il))
        if mtp:
            for il in range(hp.n_layer, hp.n_layer + hp.n_nextn):
                t.update(blocks.mtp_tensors(hp.n_embd, hp.n_vocab, f"blk.{il}.", mf))
                t.update(_layer_tensors(hp, il))
        return t

    def fusion_candidates(self, hp: Step35HParams, mtp: bool = False) -> list:
        out = []
        for il in range(hp.n_layer + (hp.n_nextn if mtp else 0)):
            b = f"blk.{il}."
            out += blocks.qkv_fusion(b)
            out.append(blocks.gate_up_fusion(b, "_shexp" if hp.moe[il] else ""))
        return out

    def memory_plan(self, hp: Step35HParams, infos: dict, n_seq: int, n_ctx: int, n_batch: int,
                    max_outputs: int, mtp: bool = False, rollback_rows: int = 0,
                    kv_types: KVTypes = F16_KV) -> MemoryPlan:
        trunk, mtp_w = self.weights_bytes(hp, infos, mtp)
        layers = _kv_layers(hp, n_ctx, n_batch, True)
        n, m = hp.n_layer, hp.n_nextn
        kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv[0], hp.head_dim, kv_types.layers(n),
                                  layers["layer_heads"][:n], layers["layer_rows"][:n])
        mtp_kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv[0], hp.head_dim, [(kv_types.mtp_k, kv_types.mtp_v)] * m,
                                      layers["layer_heads"][n:], layers["layer_rows"][n:])
        return MemoryPlan(
            weights=trunk,
            kv_cache=kv,
            activations=StepBuffers.bytes_needed(hp, n_batch, max_outputs),
            mtp_weights=mtp_w,
            mtp_kv_cache=mtp_kv if mtp else 0,
            mtp_activations=ChainBuffers.bytes_needed(hp.n_embd, n_batch, m) if mtp else 0,
        )

    def make_cache(self, rt, hp: Step35HParams, n_seq: int, n_ctx: int, mtp: bool = False,
                   rollback_rows: int = 0, kv_types: KVTypes = F16_KV, n_batch: int = 0) -> KVCache:
        # the MTP blocks' KV are layers n_layer..; rejected drafts roll back by the lengths alone (a ring keeps
        # a batch's worth of rows more than its window for that)
        types = kv_types.layers(hp.n_layer) + ([(kv_types.mtp_k, kv_types.mtp_v)] * hp.n_nextn if mtp else [])
        return KVCache(rt, n_seq, n_ctx, hp.n_head_kv[0], hp.head_dim, types,
                       **_kv_layers(hp, n_ctx, n_batch or n_ctx, mtp))

    def step_buffers(self, rt, hp: Step35HParams, max_tokens: int, max_outputs: int) -> StepBuffers:
        return StepBuffers(rt, hp, max_tokens, max_outputs)

    def mtp_buffers(self, rt, hp: Step35HParams, max_tokens: int) -> ChainBuffers:
        return ChainBuffers(rt, hp.n_embd, max_tokens, hp.n_nextn)

    # -- the step -----------------------------------------------------------------------------------------

    def _layer(self, rt, mm, hp, w, il, buf, cache, n, x) -> list[Launch]:
        """One block over residual stream x (buf.x for the trunk, an MTP block's region of the pool)."""
        b = f"blk.{il}."
        L = norm.rms_norm(rt, x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # attn_norm
        L += blocks.attention(rt, mm, _attention(hp, il), w, b, buf.cur, buf.proj, buf.q, buf.kqv_out, x, cache, il,
                              buf.pos, buf.seq, n, window=hp.window(il),
                              head_gate=buf.gate if hp.head_gate[il] else None)  # ffn_inp
        L += norm.rms_norm(rt, x, buf.cur, w[b + "ffn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # ffn_norm
        if not hp.moe[il]:
            return L + blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, x, hp.n_ff[il], n,
                                         limit=hp.clamp_shexp[il])  # l_out
        L += moe.moe_ffn(rt, mm, buf.cur, x, w[b + "ffn_gate_inp.weight"], w[b + "ffn_gate_exps.weight"],
                         w[b + "ffn_up_exps.weight"], w[b + "ffn_down_exps.weight"], hp.n_expert, hp.n_expert_used,
                         hp.expert_weights_scale, buf.moe, n, gating="sigmoid",
                         selection_bias=w[b + "exp_probs_b.bias"], norm=hp.expert_weights_norm,
                         limit=hp.clamp_exp[il])  # ffn_moe_out
        L += blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, x, hp.n_ff_shexp, n, "_shexp",
                               limit=hp.clamp_shexp[il])  # ffn_shared_out; l_out
        return L

    def build_step(self, rt, mm, hp: Step35HParams, w: dict, buf: StepBuffers, cache: KVCache, max_tokens: int,
                   max_outputs: int) -> list[Launch]:
        """Leaves the final hidden state of every token, before output_norm, in buf.x (h_nextn)."""
        n = max_tokens
        L = mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)  # inp_embd [n_tokens, n_embd]
        for il in range(hp.n_layer):
            L += self._layer(rt, mm, hp, w, il, buf, cache, n, buf.x)
        L += blocks.output_head(rt, mm, w["output.weight"], buf.x, buf.out_idx, buf.x_out, buf.logits, buf.argmax,
                                hp.n_embd, hp.n_vocab, max_outputs, n, w["output_norm.weight"], hp.rms_eps)
        return L

    def build_mtp_step(self, rt, mm, hp: Step35HParams, w: dict, buf: StepBuffers, mbuf: ChainBuffers,
                       cache: KVCache, max_tokens: int, max_outputs: int, hidden_src, head: int = 0) -> list[Launch]:
        """MTP block `head` (llama_model_step35::graph_mtp at nextn_layer_offset head) over (token, hidden)
        pairs; leaves its output before shared_head_norm in its region of mbuf.h (h_nextn)."""
        il = hp.n_layer + head
        b, e, n = f"blk.{il}.", hp.n_embd, max_tokens
        view, x = MtpView(buf, mbuf), mbuf.xs[head]
        embd = w.get(b + "nextn.embed_tokens.weight", w["token_embd.weight"])
        L = mm.get_rows(embd, mbuf.ids, view.cur, n)  # mtp_tok_embd
        L += norm.rms_norm(rt, view.cur, view.cur, w[b + "nextn.enorm.weight"], e, 1, hp.rms_eps, n)  # mtp_enorm
        L += mm.matmul(w[b + "nextn.eh_proj.weight.e"], view.cur, x, n)
        L += elementwise.gather_rows(rt, hidden_src, mbuf.hid_idx, mbuf.hn, e, n, token_var=VAR_N_TOKENS)
        L += norm.rms_norm(rt, mbuf.hn, mbuf.hn, w[b + "nextn.hnorm.weight"], e, 1, hp.rms_eps, n)  # mtp_hnorm
        L += mm.matmul(w[b + "nextn.eh_proj.weight.h"], mbuf.hn, x, n, accumulate=True)  # mtp_eh_proj
        L += self._layer(rt, mm, hp, w, il, view, cache, n, x)  # mtp_post_ffn = h_nextn
        head_norm = w.get(b + "nextn.shared_head_norm.weight", w["output_norm.weight"])
        head_w = blocks.mtp_head_weight(w, b)
        L += blocks.output_head(rt, mm, head_w, x, mbuf.out_idx, view.x_out, view.logits, view.argmax, e,
                                head_w.n_rows, max_outputs, n, head_norm, hp.rms_eps)
        return L

ARCH = Step35("step35")
