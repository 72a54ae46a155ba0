"""The dense decoder shared by `llama`, `qwen2` and `qwen3`: hparams from GGUF metadata, tensors, and the step.

The step is a residual loop built from shared blocks (models/blocks.py): per layer, attention then SwiGLU FFN,
each on an RMS-normed copy of the residual stream, each added back into it (the output projections
accumulate straight into the residual). Intermediate names follow llama.cpp's `cb(cur, name, il)`.
"""

from dataclasses import dataclass

from nextn.cl.launch import Launch
from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVCache, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.models import blocks
from nextn.models.base import Architecture, head_tensors
from nextn.models.blocks import F32, AttentionShape
from nextn.ops import norm


@dataclass(frozen=True)
class DenseHParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    n_rot: int
    rope_neox: bool
    rope_freq_base: float
    rope_freq_scale: float
    rms_eps: float
    qk_norm: bool
    qkv_bias: bool = False  # q/k/v biases (qwen2), read from the file

    @classmethod
    def from_file(cls, mf: ModelFile, *, rope_neox: bool, qk_norm: bool) -> "DenseHParams":
        n_embd = mf.int_key("{arch}.embedding_length", lo=1)
        n_head = mf.int_key("{arch}.attention.head_count", lo=1)
        head_dim = mf.int_key("{arch}.attention.key_length", n_embd // n_head, lo=2)
        if mf.int_key("{arch}.attention.value_length", head_dim) != head_dim:
            raise ModelLoadError(f"{mf.path}: key and value head sizes differ, which nextn does not support")
        n_vocab = mf.key("{arch}.vocab_size", None)
        if n_vocab is None:
            n_vocab = len(mf.key("tokenizer.ggml.tokens"))
        scale = 1.0
        scaling_type = mf.key("{arch}.rope.scaling.type", "none")
        if scaling_type == "linear":
            scale = 1.0 / mf.float_key("{arch}.rope.scaling.factor", 1.0, positive=True)
        elif scaling_type not in ("none", None):
            raise ModelLoadError(f"{mf.path}: RoPE scaling '{scaling_type}' is not supported (linear and none are)")
        if isinstance(mf.key("{arch}.attention.head_count_kv", n_head), list):
            raise ModelLoadError(f"{mf.path}: per-layer head_count_kv is not supported")
        n_head_kv = mf.int_key("{arch}.attention.head_count_kv", n_head, lo=1)
        if n_head % n_head_kv:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.attention.head_count {n_head} is not a multiple of "
                                 f"head_count_kv {n_head_kv}")
        n_rot = mf.int_key("{arch}.rope.dimension_count", head_dim, lo=2)
        if n_rot % 2 or n_rot > head_dim:
            raise ModelLoadError(f"{mf.path}: {mf.arch}.rope.dimension_count = {n_rot} must be even and at most the "
                                 f"head size {head_dim}")
        return cls(
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=mf.int_key("{arch}.block_count", lo=1),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=mf.int_key("{arch}.feed_forward_length", lo=1),
            n_ctx_train=mf.int_key("{arch}.context_length", lo=1),
            n_rot=n_rot,
            rope_neox=rope_neox,
            rope_freq_base=mf.float_key("{arch}.rope.freq_base", 10000.0, positive=True),
            rope_freq_scale=scale,
            rms_eps=mf.float_key("{arch}.attention.layer_norm_rms_epsilon", positive=True),
            qk_norm=qk_norm,
            qkv_bias=blocks.has_qkv_biases(mf, "blk.0."),
        )


class Dense(Architecture):
    """The dense decoder, parameterized by what differs between its architectures."""

    def __init__(self, name: str, *, rope_neox: bool, qk_norm: bool):
        super().__init__(name)
        self.rope_neox, self.qk_norm = rope_neox, qk_norm

    def hparams(self, mf: ModelFile) -> DenseHParams:
        return DenseHParams.from_file(mf, rope_neox=self.rope_neox, qk_norm=self.qk_norm)

    @staticmethod
    def _attention(hp: DenseHParams) -> AttentionShape:
        return AttentionShape(hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_rot, hp.rope_neox, hp.rope_freq_base,
                              hp.rope_freq_scale, hp.rms_eps)

    def tensor_table(self, hp: DenseHParams, mf: ModelFile, mtp: bool = False) -> dict:
        if mf.has("blk.0.attn_qkv.weight"):
            raise ModelLoadError(f"{mf.path}: fused attn_qkv tensors are not supported for {mf.arch}")
        e = hp.n_embd
        t = head_tensors(hp, mf)
        if mf.has("rope_freqs.weight"):  # Llama 3.1 / 3.2: one divisor per rotated pair, shared by the layers
            t["rope_freqs.weight"] = ((hp.n_rot // 2,), F32)
        a = self._attention(hp)
        for il in range(hp.n_layer):
            b = f"blk.{il}."
            t[b + "attn_norm.weight"] = ((e,), F32)
            t.update(blocks.attention_tensors(a, e, b, hp.qk_norm, hp.qkv_bias))
            t[b + "ffn_norm.weight"] = ((e,), F32)
            t.update(blocks.swiglu_tensors(e, hp.n_ff, b))
        return t

    def fusion_candidates(self, hp: DenseHParams, mtp: bool = False) -> list[tuple[str, list[str]]]:
        out = []
        for il in range(hp.n_layer):
            b = f"blk.{il}."
            out += [*blocks.qkv_fusion(b), blocks.gate_up_fusion(b)]
        return out

    def memory_plan(self, hp: DenseHParams, infos: dict, n_seq: int, n_ctx: int, n_batch: int, max_outputs: int,
                    mtp: bool = False, rollback_rows: int = 0, kv_types: KVTypes = F16_KV) -> MemoryPlan:
        return MemoryPlan(
            weights=self.weights_bytes(hp, infos)[0],
            kv_cache=KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(hp.n_layer)),
            activations=StepBuffers.bytes_needed(hp, n_batch, max_outputs),
        )

    def make_cache(self, rt, hp: DenseHParams, n_seq: int, n_ctx: int, mtp: bool = False, rollback_rows: int = 0,
                   kv_types: KVTypes = F16_KV, n_batch: int = 0) -> KVCache:
        # a KV cache rolls back by its lengths alone: rejected draft positions are overwritten later
        return KVCache(rt, n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(hp.n_layer))

    def step_buffers(self, rt, hp: DenseHParams, max_tokens: int, max_outputs: int) -> "StepBuffers":
        return StepBuffers.allocate(rt, hp, max_tokens, max_outputs)

    def build_step(self, rt, mm, hp: DenseHParams, w: dict, buf: "StepBuffers", cache: KVCache, max_tokens: int,
                   max_outputs: int) -> list[Launch]:
        n = max_tokens
        a = self._attention(hp)
        L: list[Launch] = []
        L += mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)  # inp_embd [n_tokens, n_embd]
        for il in range(hp.n_layer):
            b = f"blk.{il}."
            L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
            L += blocks.attention(rt, mm, a, w, b, buf.cur, buf.qkv, buf.q, buf.kqv_out, buf.x, cache, il,
                                  buf.pos, buf.seq, n)
            L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "ffn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)
            L += blocks.swiglu_ffn(rt, mm, w, b, buf.cur, buf.gate_up, buf.act, buf.x, hp.n_ff, n)  # l_out
        # output head, only on the rows whose logits are wanted
        L += blocks.output_head(rt, mm, w["output.weight"], buf.x, buf.out_idx, buf.x_out, buf.logits, buf.argmax,
                                hp.n_embd, hp.n_vocab, max_outputs, n, w["output_norm.weight"], hp.rms_eps)
        return L


@dataclass
class StepBuffers:
    """Device buffers of one batch: per-token inputs, activations and outputs."""

    ids: object  # int32 [max_tokens]            token ids
    pos: object  # int32 [max_tokens]            position of each token in its sequence
    seq: object  # int32 [max_tokens]            sequence (slot) of each token
    out_idx: object  # int32 [max_tokens]        batch rows whose logits are wanted
    x: object  # f32 [max_tokens, n_embd]        residual stream
    cur: object  # f32 [max_tokens, n_embd]      normed copy
    qkv: object  # f32 [max_tokens, (n_head + 2 n_head_kv) * head_dim]   Q|K|V projections side by side
    q: object  # f32 [max_tokens, n_head*head_dim]                      normed, roped Q
    kqv_out: object  # f32 [max_tokens, n_head*head_dim]
    gate_up: object  # f32 [max_tokens, 2 n_ff]                          gate|up projections side by side
    act: object  # f32 [max_tokens, n_ff]                                silu(gate) * up
    x_out: object  # f32 [max_tokens, n_embd]    rows gathered for the output head
    logits: object  # f32 [max_tokens, n_vocab]
    argmax: object  # int32 [max_tokens]

    @classmethod
    def allocate(cls, rt, hp: DenseHParams, max_tokens: int, max_outputs: int) -> "StepBuffers":
        n, n_out = max_tokens, max_outputs
        f = 4
        return cls(
            ids=rt.alloc(n * 4, "batch.ids"),
            pos=rt.alloc(n * 4, "batch.pos"),
            seq=rt.alloc(n * 4, "batch.seq"),
            out_idx=rt.alloc(n * 4, "batch.out_idx"),
            x=rt.alloc(n * hp.n_embd * f, "act.x"),
            cur=rt.alloc(n * hp.n_embd * f, "act.cur"),
            qkv=rt.alloc(n * (hp.n_head + 2 * hp.n_head_kv) * hp.head_dim * f, "act.qkv"),
            q=rt.alloc(n * hp.n_head * hp.head_dim * f, "act.q"),
            kqv_out=rt.alloc(n * hp.n_head * hp.head_dim * f, "act.kqv_out"),
            gate_up=rt.alloc(n * 2 * hp.n_ff * f, "act.gate_up"),
            act=rt.alloc(n * hp.n_ff * f, "act.ffn"),
            x_out=rt.alloc(n_out * hp.n_embd * f, "act.x_out"),
            logits=rt.alloc(n_out * hp.n_vocab * f, "act.logits"),
            argmax=rt.alloc(n_out * 4, "act.argmax"),
        )

    @staticmethod
    def bytes_needed(hp: DenseHParams, max_tokens: int, max_outputs: int) -> int:
        per_token = 4 * (4 + 2 * hp.n_embd + 3 * hp.n_head * hp.head_dim + 2 * hp.n_head_kv * hp.head_dim + 3 * hp.n_ff)
        per_output = 4 * (hp.n_embd + hp.n_vocab + 1)
        return per_token * max_tokens + per_output * max_outputs
