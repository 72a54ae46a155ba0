"""The dense decoder shared by `llama` and `qwen3`: hparams from GGUF metadata, tensors, and the step.

The step is a residual loop built from shared blocks (engine/ops): per layer, attention then SwiGLU FFN,
each on an RMS-normed copy of the residual stream, each added back into it (the output projections
accumulate straight into the residual). Intermediate names follow llama.cpp's `cb(cur, name, il)`.
"""

from dataclasses import dataclass

import gguf
import numpy as np

from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.ops import attention, elementwise, norm, rope, select
from nextn.ops.launch import VAR_N_OUTPUTS, Launch
from nextn.ops.weights import SUPPORTED_TYPES, DeviceWeight, device_bytes, upload_weight

F32 = frozenset({gguf.GGMLQuantizationType.F32})


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

    @classmethod
    def from_file(cls, mf: ModelFile, *, rope_neox: bool, qk_norm: bool) -> "DenseHParams":
        n_embd = int(mf.key("{arch}.embedding_length"))
        n_head = int(mf.key("{arch}.attention.head_count"))
        head_dim = int(mf.key("{arch}.attention.key_length", n_embd // n_head))
        if int(mf.key("{arch}.attention.value_length", head_dim)) != head_dim:
            raise ModelLoadError(f"{mf.path}: key and value head sizes differ, which nextn does not support")
        n_vocab = mf.key("{arch}.vocab_size", None)
        if n_vocab is None:
            n_vocab = len(mf.key("tokenizer.ggml.tokens"))
        scale = 1.0
        scaling_type = mf.key("{arch}.rope.scaling.type", "none")
        if scaling_type == "linear":
            scale = 1.0 / float(mf.key("{arch}.rope.scaling.factor", 1.0))
        elif scaling_type not in ("none", None):
            raise ModelLoadError(f"{mf.path}: RoPE scaling '{scaling_type}' is not supported (linear and none are)")
        if mf.has("rope_freqs.weight"):
            raise ModelLoadError(
                f"{mf.path}: per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 style) are not "
                f"supported yet"
            )
        head_count_kv = mf.key("{arch}.attention.head_count_kv", n_head)
        if isinstance(head_count_kv, list):
            raise ModelLoadError(f"{mf.path}: per-layer head_count_kv is not supported")
        return cls(
            n_vocab=int(n_vocab),
            n_embd=n_embd,
            n_layer=int(mf.key("{arch}.block_count")),
            n_head=n_head,
            n_head_kv=int(head_count_kv),
            head_dim=head_dim,
            n_ff=int(mf.key("{arch}.feed_forward_length")),
            n_ctx_train=int(mf.key("{arch}.context_length")),
            n_rot=int(mf.key("{arch}.rope.dimension_count", head_dim)),
            rope_neox=rope_neox,
            rope_freq_base=float(mf.key("{arch}.rope.freq_base", 10000.0)),
            rope_freq_scale=scale,
            rms_eps=float(mf.key("{arch}.attention.layer_norm_rms_epsilon")),
            qk_norm=qk_norm,
        )


def tensor_table(hp: DenseHParams, mf: ModelFile) -> dict[str, tuple[tuple[int, ...], frozenset]]:
    """name -> (GGUF shape, allowed types) of every tensor the model reads."""
    e, q, kv = hp.n_embd, hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    t = {
        "token_embd.weight": ((e, hp.n_vocab), SUPPORTED_TYPES),
        "output_norm.weight": ((e,), F32),
    }
    if mf.has("output.weight"):
        t["output.weight"] = ((e, hp.n_vocab), SUPPORTED_TYPES)
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        t[b + "attn_norm.weight"] = ((e,), F32)
        t[b + "attn_q.weight"] = ((e, q), SUPPORTED_TYPES)
        t[b + "attn_k.weight"] = ((e, kv), SUPPORTED_TYPES)
        t[b + "attn_v.weight"] = ((e, kv), SUPPORTED_TYPES)
        t[b + "attn_output.weight"] = ((q, e), SUPPORTED_TYPES)
        if hp.qk_norm:
            t[b + "attn_q_norm.weight"] = ((hp.head_dim,), F32)
            t[b + "attn_k_norm.weight"] = ((hp.head_dim,), F32)
        t[b + "ffn_norm.weight"] = ((e,), F32)
        t[b + "ffn_gate.weight"] = ((e, hp.n_ff), SUPPORTED_TYPES)
        t[b + "ffn_up.weight"] = ((e, hp.n_ff), SUPPORTED_TYPES)
        t[b + "ffn_down.weight"] = ((hp.n_ff, e), SUPPORTED_TYPES)
    return t


def check_tensors(hp: DenseHParams, mf: ModelFile) -> dict:
    """Validate every tensor (shape and type) before anything is uploaded; returns name -> TensorInfo."""
    if mf.has("blk.0.attn_qkv.weight"):
        raise ModelLoadError(f"{mf.path}: fused attn_qkv tensors are not supported for {mf.arch}")
    return {name: mf.tensor(name, ne, types) for name, (ne, types) in tensor_table(hp, mf).items()}


def weights_bytes(infos: dict) -> int:
    """Device bytes the weights will occupy (norms as float32, matrices in their device layout)."""
    total = 0
    for info in infos.values():
        if len(info.ne) == 1:
            total += 4 * info.ne[0]
        else:
            total += device_bytes(info.qtype, info.n_rows, info.n_cols)
    return total


def upload(rt, mf: ModelFile, infos: dict, progress=None) -> dict:
    """Upload every tensor; matrices as DeviceWeight, 1-D norms as float32 buffers."""
    out = {}
    for name, info in infos.items():
        if len(info.ne) == 1:
            out[name] = rt.upload(np.array(mf.array_f32(info)), name)
        else:
            out[name] = upload_weight(rt, mf.raw(info), info.qtype, info.n_rows, info.n_cols, name)
        if progress is not None:
            progress(info.nbytes)
    if "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # tied embeddings: the same device buffers
    return out


@dataclass
class StepBuffers:
    """Device buffers of one batch: per-token inputs, activations and outputs."""

    ids: object  # int32 [max_tokens]            token ids
    pos: object  # int32 [max_tokens]            position of each token in its sequence
    seq: object  # int32 [max_tokens]            sequence (slot) of each token
    out_idx: object  # int32 [max_tokens]        batch rows whose logits are wanted
    x: object  # f32 [max_tokens, n_embd]        residual stream
    cur: object  # f32 [max_tokens, n_embd]      normed copy
    q: object
    k: object
    v: object
    kqv_out: object  # f32 [max_tokens, n_head*head_dim]
    gate: object  # f32 [max_tokens, n_ff]
    up: object
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
            q=rt.alloc(n * hp.n_head * hp.head_dim * f, "act.q"),
            k=rt.alloc(n * hp.n_head_kv * hp.head_dim * f, "act.k"),
            v=rt.alloc(n * hp.n_head_kv * hp.head_dim * f, "act.v"),
            kqv_out=rt.alloc(n * hp.n_head * hp.head_dim * f, "act.kqv_out"),
            gate=rt.alloc(n * hp.n_ff * f, "act.gate"),
            up=rt.alloc(n * hp.n_ff * f, "act.up"),
            x_out=rt.alloc(n_out * hp.n_embd * f, "act.x_out"),
            logits=rt.alloc(n_out * hp.n_vocab * f, "act.logits"),
            argmax=rt.alloc(n_out * 4, "act.argmax"),
        )

    @staticmethod
    def bytes_needed(hp: DenseHParams, max_tokens: int, max_outputs: int) -> int:
        per_token = 4 * (4 + 2 * hp.n_embd + 2 * hp.n_head * hp.head_dim + 2 * hp.n_head_kv * hp.head_dim + 2 * hp.n_ff)
        per_output = 4 * (hp.n_embd + hp.n_vocab + 1)
        return per_token * max_tokens + per_output * max_outputs


def build_step(rt, mm, hp: DenseHParams, w: dict, buf: StepBuffers, cache, max_tokens: int,
               max_outputs: int) -> list[Launch]:
    """The launches of one forward step over up to `max_tokens` tokens, ending in logits and argmax of up to
    `max_outputs` of them.

    `mm` is a MatmulOps; `cache` a KVCache whose per-layer buffers hold all sequences.
    """
    n, hd = max_tokens, hp.head_dim
    L: list[Launch] = []
    L += mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)  # inp_embd [n_tokens, n_embd]
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        # attention block
        L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # attn_norm
        L += mm.matmul(w[b + "attn_q.weight"], buf.cur, buf.q, n)  # Qcur [n_tokens, n_head*hd]
        L += mm.matmul(w[b + "attn_k.weight"], buf.cur, buf.k, n)  # Kcur [n_tokens, n_head_kv*hd]
        L += mm.matmul(w[b + "attn_v.weight"], buf.cur, buf.v, n)  # Vcur [n_tokens, n_head_kv*hd]
        if hp.qk_norm:
            L += norm.rms_norm(rt, buf.q, buf.q, w[b + "attn_q_norm.weight"], hd, hp.n_head, hp.rms_eps, n)
            L += norm.rms_norm(rt, buf.k, buf.k, w[b + "attn_k_norm.weight"], hd, hp.n_head_kv, hp.rms_eps, n)
        for x, heads in ((buf.q, hp.n_head), (buf.k, hp.n_head_kv)):
            L += rope.rope(rt, x, buf.pos, heads, hd, hp.n_rot, hp.rope_neox, hp.rope_freq_base, hp.rope_freq_scale, n)
        k_cache, v_cache = cache.layer(il)
        L += attention.kv_store(rt, buf.k, buf.v, k_cache, v_cache, buf.pos, buf.seq, hp.n_head_kv, hd, cache.n_ctx, n)
        L += attention.attention(
            rt, buf.q, k_cache, v_cache, buf.pos, buf.seq, buf.kqv_out,
            hp.n_head, hp.n_head_kv, hd, cache.n_ctx, 1.0 / np.sqrt(hd), n,
        )  # kqv_out [n_tokens, n_head*hd]
        L += mm.matmul(w[b + "attn_output.weight"], buf.kqv_out, buf.x, n, accumulate=True)  # ffn_inp = x + attn
        # feed-forward block
        L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "ffn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # ffn_norm
        L += mm.matmul(w[b + "ffn_gate.weight"], buf.cur, buf.gate, n)  # ffn_gate [n_tokens, n_ff]
        L += mm.matmul(w[b + "ffn_up.weight"], buf.cur, buf.up, n)  # ffn_up [n_tokens, n_ff]
        L += elementwise.swiglu(rt, buf.gate, buf.up, buf.gate, hp.n_ff, n)  # ffn_swiglu
        L += mm.matmul(w[b + "ffn_down.weight"], buf.gate, buf.x, n, accumulate=True)  # l_out = ffn_inp + ffn
    # output head, only on the rows whose logits are wanted
    m = min(max_outputs, n)
    L += elementwise.gather_rows(rt, buf.x, buf.out_idx, buf.x_out, hp.n_embd, m)
    L += norm.rms_norm(rt, buf.x_out, buf.x_out, w["output_norm.weight"], hp.n_embd, 1, hp.rms_eps, m, token_var=VAR_N_OUTPUTS)
    L += mm.matmul(w["output.weight"], buf.x_out, buf.logits, m, token_var=VAR_N_OUTPUTS)  # result_output
    L += select.argmax(rt, buf.logits, buf.argmax, hp.n_vocab, m)
    return L
