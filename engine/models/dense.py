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
from nextn.memory.kv_cache import KVCache
from nextn.memory.plan import MemoryPlan
from nextn.memory.prompt_cache import KVPrefixStore
from nextn.ops import attention, elementwise, norm, qkv, select
from nextn.cl.launch import VAR_N_OUTPUTS, Launch
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


def check_tensors(hp: DenseHParams, mf: ModelFile, mtp: bool = False) -> dict:
    """Validate every tensor (shape and type) before anything is uploaded; returns name -> TensorInfo."""
    if mtp:
        raise ModelLoadError(f"{mf.path}: MTP drafting was asked for, but architecture {mf.arch} has no MTP "
                             f"(nextn) block; use a model that has one (qwen35, qwen35moe) or another draft type")
    if mf.has("blk.0.attn_qkv.weight"):
        raise ModelLoadError(f"{mf.path}: fused attn_qkv tensors are not supported for {mf.arch}")
    return {name: mf.tensor(name, ne, types) for name, (ne, types) in tensor_table(hp, mf).items()}


def fusion_candidates(hp: DenseHParams) -> list[tuple[str, list[str]]]:
    """(device name, file tensors) that the step reads as one row-concatenated weight when their types agree."""
    out = []
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        out.append((b + "attn_qkv.weight", [b + p + ".weight" for p in ("attn_q", "attn_k", "attn_v")]))
        out.append((b + "ffn_gate_up.weight", [b + p + ".weight" for p in ("ffn_gate", "ffn_up")]))
    return out


def fused_groups(infos: dict, candidates) -> dict[str, list[str]]:
    """Device weight name -> the file tensors concatenated (by rows) into it. A candidate group (Q|K|V,
    gate|up) is fused when its members' types agree (one mat-vec instead of three or two); otherwise each
    member stays itself and the step writes them side by side into the same activation row."""
    groups: dict[str, list[str]] = {}
    fused = set()
    for name, members in candidates:
        if all(m in infos for m in members) and len({infos[m].qtype for m in members}) == 1:
            groups[name] = members
            fused.update(members)
    for name in infos:
        if name not in fused:
            groups[name] = [name]
    return groups


def weights_bytes(hp: DenseHParams, infos: dict) -> int:
    """Device bytes the weights will occupy (norms as float32, matrices in their device layout)."""
    total = 0
    for members in fused_groups(infos, fusion_candidates(hp)).values():
        first = infos[members[0]]
        if len(first.ne) == 1:
            total += 4 * first.ne[0]
        else:
            total += device_bytes(first.qtype, sum(infos[m].n_rows for m in members), first.n_cols)
    return total


def upload_group(rt, mf: ModelFile, infos: dict, members: list[str], name: str):
    """One device weight: a 1-D tensor as float32, a matrix (or row-concatenated matrices) as DeviceWeight."""
    first = infos[members[0]]
    if len(first.ne) == 1:
        return rt.upload(np.array(mf.array_f32(first)), name)
    raw = mf.raw(first) if len(members) == 1 else np.concatenate([mf.raw(infos[m]) for m in members])
    n_rows = sum(infos[m].n_rows for m in members)
    return upload_weight(rt, raw, first.qtype, n_rows, first.n_cols, name)


def upload(rt, hp: DenseHParams, mf: ModelFile, infos: dict, progress=None, mtp: bool = False) -> dict:
    """Upload every tensor; matrices as DeviceWeight (fused groups concatenated), 1-D norms as float32."""
    out = {}
    for name, members in fused_groups(infos, fusion_candidates(hp)).items():
        out[name] = upload_group(rt, mf, infos, members, name)
        if progress is not None:
            progress(sum(infos[m].nbytes for m in members))
    if "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # tied embeddings: the same device buffers
    return out


def memory_plan(hp: DenseHParams, infos: dict, n_seq: int, n_ctx: int, n_batch: int, max_outputs: int,
                mtp: bool = False, rollback_rows: int = 0) -> MemoryPlan:
    return MemoryPlan(
        weights=weights_bytes(hp, infos),
        kv_cache=KVCache.bytes_needed(hp.n_layer, n_seq, n_ctx, hp.n_head_kv, hp.head_dim),
        activations=StepBuffers.bytes_needed(hp, n_batch, max_outputs),
    )


def make_cache(rt, hp: DenseHParams, n_seq: int, n_ctx: int, mtp: bool = False, rollback_rows: int = 0) -> KVCache:
    # a KV cache rolls back by its lengths alone: rejected draft positions are overwritten later
    return KVCache(rt, hp.n_layer, n_seq, n_ctx, hp.n_head_kv, hp.head_dim)


def prefix_store(cache: KVCache) -> KVPrefixStore:
    return KVPrefixStore(cache)


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


def build_step(rt, mm, hp: DenseHParams, w: dict, buf: StepBuffers, cache, max_tokens: int,
               max_outputs: int) -> list[Launch]:
    """The launches of one forward step over up to `max_tokens` tokens, ending in logits and argmax of up to
    `max_outputs` of them.

    `mm` is a MatmulOps; `cache` a KVCache whose per-layer buffers hold all sequences.
    """
    n, hd = max_tokens, hp.head_dim
    L: list[Launch] = []
    L += mm.get_rows(w["token_embd.weight"], buf.ids, buf.x, n)  # inp_embd [n_tokens, n_embd]
    q_dim, kv_dim = hp.n_head * hd, hp.n_head_kv * hd
    qkv_dim = q_dim + 2 * kv_dim
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        # attention block
        L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "attn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # attn_norm
        if b + "attn_qkv.weight" in w:  # Qcur|Kcur|Vcur [n_tokens, qkv_dim]
            L += mm.matmul(w[b + "attn_qkv.weight"], buf.cur, buf.qkv, n)
        else:
            for name, offset in (("attn_q", 0), ("attn_k", q_dim), ("attn_v", q_dim + kv_dim)):
                L += mm.matmul(w[b + name + ".weight"], buf.cur, buf.qkv, n, y_stride=qkv_dim, y_offset=offset)
        k_cache, v_cache = cache.layer(il)
        # q/k norm + rope; Q to buf.q, K and V into the cache at (seq, pos)
        L += qkv.qkv_prep(
            rt, buf.qkv, buf.q, k_cache, v_cache, buf.pos, buf.seq,
            w.get(b + "attn_q_norm.weight"), w.get(b + "attn_k_norm.weight"),
            n_head=hp.n_head, n_head_kv=hp.n_head_kv, head_dim=hd, n_rot=hp.n_rot, neox=hp.rope_neox,
            freq_base=hp.rope_freq_base, freq_scale=hp.rope_freq_scale, eps=hp.rms_eps,
            n_ctx=cache.n_ctx, n_seq=cache.n_seq,
        )
        L += attention.attention(
            rt, buf.q, k_cache, v_cache, buf.pos, buf.seq, buf.kqv_out,
            hp.n_head, hp.n_head_kv, hd, cache.n_ctx, 1.0 / np.sqrt(hd), n,
        )  # kqv_out [n_tokens, n_head*hd]
        L += mm.matmul(w[b + "attn_output.weight"], buf.kqv_out, buf.x, n, accumulate=True)  # ffn_inp = x + attn
        # feed-forward block
        L += norm.rms_norm(rt, buf.x, buf.cur, w[b + "ffn_norm.weight"], hp.n_embd, 1, hp.rms_eps, n)  # ffn_norm
        if b + "ffn_gate_up.weight" in w:  # ffn_gate|ffn_up [n_tokens, 2 n_ff]
            L += mm.matmul(w[b + "ffn_gate_up.weight"], buf.cur, buf.gate_up, n)
        else:
            for name, offset in (("ffn_gate", 0), ("ffn_up", hp.n_ff)):
                L += mm.matmul(w[b + name + ".weight"], buf.cur, buf.gate_up, n, y_stride=2 * hp.n_ff, y_offset=offset)
        L += elementwise.swiglu_fused(rt, buf.gate_up, buf.act, hp.n_ff)  # ffn_swiglu [n_tokens, n_ff]
        L += mm.matmul(w[b + "ffn_down.weight"], buf.act, buf.x, n, accumulate=True)  # l_out = ffn_inp + ffn
    # output head, only on the rows whose logits are wanted
    m = min(max_outputs, n)
    L += elementwise.gather_rows(rt, buf.x, buf.out_idx, buf.x_out, hp.n_embd, m)
    L += norm.rms_norm(rt, buf.x_out, buf.x_out, w["output_norm.weight"], hp.n_embd, 1, hp.rms_eps, m, token_var=VAR_N_OUTPUTS)
    L += mm.matmul(w["output.weight"], buf.x_out, buf.logits, m, token_var=VAR_N_OUTPUTS)  # result_output
    L += select.argmax(rt, buf.logits, buf.argmax, hp.n_vocab, m)
    return L
