"""Blocks the architectures share: each returns the launches of one piece of a step.

An architecture file composes its step from these (and from engine/ops for what is its own, such as the
Gated DeltaNet mixer). Tensor names are llama.cpp's, with `b` the layer prefix ("blk.3."); intermediate
names in comments follow llama.cpp's `cb(cur, name, il)`.

- `projection`: one input through several weights written side by side into one activation row - a single
  mat-vec when the loader fused them (their types agreed), else one per weight at its column offset;
- `attention`: Q|K|V projection, q/k norm + RoPE + KV store, causal GQA attention over the cache, the
  optional per-head output gate (qwen35), the output projection accumulated into the residual stream;
- `swiglu_ffn`: gate|up projection, silu(gate) * up, down projection (dense FFN and a shared expert);
- `moe_ffn`: routed experts (engine/ops/moe.py);
- `output_head`: the rows whose logits are wanted, (normed,) projected over the vocabulary, argmax;
- the MTP (NextN) block: its tensors, its buffers, its eh_proj upload and its step, the same for every
  architecture that ships one (Qwen3.5/3.6, GLM-4.5..4.7): only the decoder layer inside it is the arch's.
"""

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_OUTPUTS, VAR_N_TOKENS, Launch
from nextn.ops import attention as attn_ops
from nextn.ops import elementwise, moe, norm, qkv, select
from nextn.ops.weights import SUPPORTED_TYPES, device_bytes, upload_weight

F32 = frozenset({gguf.GGMLQuantizationType.F32})
ANY = SUPPORTED_TYPES


def projection(mm, w: dict, fused: str, parts: list[tuple[str, int]], x, y, n: int, row: int) -> list[Launch]:
    """y[:, offset_i + r] = x @ W_i for parts (name_i, offset_i), rows of y `row` floats wide: one mat-vec over
    the row-concatenated device weight `fused` when the loader made it, else one per part."""
    if fused in w:
        return mm.matmul(w[fused], x, y, n)
    out = []
    for name, offset in parts:
        out += mm.matmul(w[name], x, y, n, y_stride=row, y_offset=offset)
    return out


# -- attention -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    neox: bool  # NeoX RoPE (halves rotated) or GGML's NORM mode (adjacent pairs)
    freq_base: float
    freq_scale: float
    eps: float  # of the q/k RMSNorm
    gated: bool = False  # each Q head is followed by head_dim output-gate values (qwen35)
    mrope_sections: tuple[int, int, int, int] | None = None  # qwen35's, when pairs fall on the e section
    freq_factors: bool = True  # rope_freqs.weight divides the angles when the file has it (step35: full layers)

    @property
    def q_width(self) -> int:
        """Floats the Q projection writes per token (with the gates when gated)."""
        return (2 if self.gated else 1) * self.n_head * self.head_dim

    @property
    def row(self) -> int:
        """Floats of one token's Q|K|V projection row."""
        return self.q_width + 2 * self.n_head_kv * self.head_dim


def attention(rt, mm, a: AttentionShape, w: dict, b: str, x_in, proj, q, out, residual, cache, il: int, pos,
              seq, n: int, fused: str = "attn_qkv", window: int = 0, head_gate=None) -> list[Launch]:
    """residual += attn_output(attention(rope(norm(Q)), rope(norm(K)), V) [* sigmoid(gate)]) from x_in.

    proj [n, a.row] takes the projections, q [n, n_head*head_dim] the prepared Q, out the attention output;
    K and V go into the cache at (seq, pos). `fused` names the fused Q|K|V device weight (qwen35 calls it
    attn_qgkv: its linear layers have their own attn_qkv). window > 0: a sliding-window layer (its cache
    may be a ring: cache.layer_rows). head_gate: a buffer [n, n_head] for step35's head-wise gate, out *=
    sigmoid(attn_gate x_in) per head."""
    kv_dim = a.n_head_kv * a.head_dim
    L = projection(mm, w, b + fused + ".weight",
                   [(b + "attn_q.weight", 0), (b + "attn_k.weight", a.q_width),
                    (b + "attn_v.weight", a.q_width + kv_dim)], x_in, proj, n, a.row)
    if b + "attn_qkv.bias" in w:  # the q|k|v biases, concatenated at load (qkv_fusion)
        L += elementwise.add_bias(rt, proj, w[b + "attn_qkv.bias"], a.row, n)
    k_cache, v_cache = cache.layer(il)
    k_type, v_type = cache.kv_types(il)
    rows = cache.layer_rows(il) if window else None
    shape = {"n_head": a.n_head, "n_head_kv": a.n_head_kv, "head_dim": a.head_dim, "n_rot": a.n_rot, "neox": a.neox}
    # q/k norm + rope; Q to q, K and V into the cache at (seq, pos)
    L += qkv.qkv_prep(rt, proj, q, k_cache, v_cache, pos, seq, w.get(b + "attn_q_norm.weight"),
                      w.get(b + "attn_k_norm.weight"), **shape, freq_base=a.freq_base, freq_scale=a.freq_scale,
                      eps=a.eps, n_ctx=cache.n_ctx, n_seq=cache.n_seq, q_gate=a.gated,
                      freq_factors=w.get("rope_freqs.weight") if a.freq_factors else None,
                      mrope_sections=a.mrope_sections, k_type=k_type, v_type=v_type,
                      rows=rows)  # Llama 3.1's per-pair frequency divisors
    L += attn_ops.attention(rt, q, k_cache, v_cache, pos, seq, out, a.n_head, a.n_head_kv, a.head_dim,
                            cache.n_ctx, 1.0 / np.sqrt(a.head_dim), n, k_type=k_type,
                            v_type=v_type, window=window, rows=rows,
                            split=cache.kv_split,  # kqv_out [n_tokens, n_head*hd] (* sigmoid(gate))
                            gate=(proj, a.row) if a.gated else None)
    if head_gate is not None:  # attn_gate [n_tokens, n_head], then attn_gated
        L += mm.matmul(w[b + "attn_gate.weight"], x_in, head_gate, n)
        L += elementwise.head_gate(rt, out, head_gate, a.n_head, a.head_dim)
    L += mm.matmul(w[b + "attn_output.weight"], out, residual, n, accumulate=True)  # ffn_inp = x + attn
    return L


def attention_tensors(a: AttentionShape, n_embd: int, b: str, qk_norm: bool, biases: bool = False) -> dict:
    """biases: q/k/v biases (qwen2, GLM), all three (a projection row gets them as one bias vector)."""
    q, kv = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
    t = {
        b + "attn_q.weight": ((n_embd, a.q_width), ANY),
        b + "attn_k.weight": ((n_embd, kv), ANY),
        b + "attn_v.weight": ((n_embd, kv), ANY),
        b + "attn_output.weight": ((q, n_embd), ANY),
    }
    if biases:
        if a.gated:
            raise ValueError("q/k/v biases with a gated Q projection")
        t.update({b + "attn_q.bias": ((q,), F32), b + "attn_k.bias": ((kv,), F32), b + "attn_v.bias": ((kv,), F32)})
    if qk_norm:
        t[b + "attn_q_norm.weight"] = ((a.head_dim,), F32)
        t[b + "attn_k_norm.weight"] = ((a.head_dim,), F32)
    return t


def has_qkv_biases(mf, b: str) -> bool:
    """Whether layer b has q/k/v biases; refuses a file with only some of them."""
    have = [mf.has(b + p + ".bias") for p in ("attn_q", "attn_k", "attn_v")]
    if any(have) and not all(have):
        from nextn.errors import ModelLoadError

        raise ModelLoadError(f"{mf.path}: {b}attn_q/k/v biases must come together (the file has only some)")
    return all(have)


def qkv_fusion(b: str, fused: str = "attn_qkv") -> list[tuple[str, list[str]]]:
    """Q|K|V weights as one device weight when their types agree; their biases (when the file has them) as
    one float32 vector attn_qkv.bias, always."""
    return [(b + fused + ".weight", [b + p + ".weight" for p in ("attn_q", "attn_k", "attn_v")]),
            (b + "attn_qkv.bias", [b + p + ".bias" for p in ("attn_q", "attn_k", "attn_v")])]


# -- feed-forward --------------------------------------------------------------------------------------------

def swiglu_ffn(rt, mm, w: dict, b: str, x_in, gate_up, act, out, n_ff: int, n: int, suffix: str = "",
               accumulate: bool = True, limit: float = 0.0) -> list[Launch]:
    """out (+)= ffn_down{suffix}(silu(ffn_gate{suffix} x_in) * ffn_up{suffix} x_in); suffix "" for the dense FFN,
    "_shexp" for a shared expert. gate_up [n, 2 n_ff] and act [n, n_ff] are scratch. limit > 0: step35's
    clamped SwiGLU."""
    L = projection(mm, w, f"{b}ffn_gate_up{suffix}.weight",
                   [(f"{b}ffn_gate{suffix}.weight", 0), (f"{b}ffn_up{suffix}.weight", n_ff)], x_in, gate_up, n,
                   2 * n_ff)  # ffn_gate|ffn_up [n_tokens, 2 n_ff]
    L += elementwise.swiglu_fused(rt, gate_up, act, n_ff, limit)  # ffn_swiglu [n_tokens, n_ff]
    L += mm.matmul(w[f"{b}ffn_down{suffix}.weight"], act, out, n, accumulate=accumulate)
    return L


def swiglu_tensors(n_embd: int, n_ff: int, b: str, suffix: str = "") -> dict:
    return {
        f"{b}ffn_gate{suffix}.weight": ((n_embd, n_ff), ANY),
        f"{b}ffn_up{suffix}.weight": ((n_embd, n_ff), ANY),
        f"{b}ffn_down{suffix}.weight": ((n_ff, n_embd), ANY),
    }


def gate_up_fusion(b: str, suffix: str = "") -> tuple[str, list[str]]:
    return f"{b}ffn_gate_up{suffix}.weight", [f"{b}ffn_gate{suffix}.weight", f"{b}ffn_up{suffix}.weight"]


def moe_ffn(rt, mm, w: dict, b: str, x_in, residual, n_expert: int, n_used: int, weights_scale: float, bufs,
            n: int) -> list[Launch]:
    """residual += the routed experts of x_in (engine/ops/moe.py: softmax routing, top-k)."""
    return moe.moe_ffn(rt, mm, x_in, residual, w[b + "ffn_gate_inp.weight"], w[b + "ffn_gate_exps.weight"],
                       w[b + "ffn_up_exps.weight"], w[b + "ffn_down_exps.weight"], n_expert, n_used,
                       weights_scale, bufs, n)


# -- output head ---------------------------------------------------------------------------------------------

def output_head(rt, mm, head_w, h, out_idx, x_out, logits, argmax, n_embd: int, n_vocab: int, max_outputs: int,
                n: int, norm_w=None, eps: float = 0.0) -> list[Launch]:
    """Logits and argmax of the rows out_idx of hidden states h: gathered into x_out, RMS-normed by norm_w
    when given (only these rows: the others' norm is not needed), projected by head_w."""
    m = min(max_outputs, n)
    L = elementwise.gather_rows(rt, h, out_idx, x_out, n_embd, m)
    if norm_w is not None:
        L += norm.rms_norm(rt, x_out, x_out, norm_w, n_embd, 1, eps, m, token_var=VAR_N_OUTPUTS)
    L += mm.matmul(head_w, x_out, logits, m, token_var=VAR_N_OUTPUTS)  # result_output
    L += select.argmax(rt, logits, argmax, n_vocab, m)
    return L


# -- the MTP (NextN) block -----------------------------------------------------------------------------------
#
# It drafts the token after next: eh_proj(enorm(embed(token)) ++ hnorm(hidden)), one decoder layer of the
# architecture, shared_head_norm, the head. `hidden` is the trunk's final hidden state of the previous
# position, which the trunk step leaves on the device for every row of its batch; or, to draft further,
# the block's own normed output of the previous draft.

def mtp_tensors(n_embd: int, n_vocab: int, b: str, mf) -> dict:
    """The block's own tensors besides its decoder layer; the optional ones as the file has them
    (shared_head_norm falls back to output_norm, embed_tokens to token_embd, shared_head_head to output)."""
    t = {
        b + "nextn.eh_proj.weight": ((2 * n_embd, n_embd), ANY),
        b + "nextn.enorm.weight": ((n_embd,), F32),
        b + "nextn.hnorm.weight": ((n_embd,), F32),
    }
    if mf.has(b + "nextn.shared_head_norm.weight"):
        t[b + "nextn.shared_head_norm.weight"] = ((n_embd,), F32)
    for name in ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight"):
        if mf.has(b + name):
            t[b + name] = ((n_embd, n_vocab), ANY)
    return t


def is_eh_proj(name: str) -> bool:
    return name.endswith("nextn.eh_proj.weight")


def eh_proj_bytes(info) -> int:
    return 2 * device_bytes(info.qtype, info.n_rows, info.n_cols // 2)


def upload_eh_proj(rt, mf, info, name: str, out: dict) -> None:
    """eh_proj as two weights: columns [0, n_embd) multiply the embedding, [n_embd, 2 n_embd) the hidden
    state, so the step needs no concatenated input (each half is whole GGUF blocks: n_embd is a row length)."""
    raw = np.asarray(mf.raw(info))
    half = raw.shape[1] // 2
    for part, cols in (("e", slice(0, half)), ("h", slice(half, None))):
        out[f"{name}.{part}"] = upload_weight(rt, np.ascontiguousarray(raw[:, cols]), info.qtype, info.n_rows,
                                              info.n_cols // 2, f"{name}.{part}")


class MtpBuffers:
    """The MTP step's own inputs and residual stream; its scratch (cur, proj, q, ...) is the trunk's, which is
    free once the trunk step is done. hid_idx: per MTP token, the row of the hidden source to use. head_rows:
    rows of h between the outputs of consecutive heads (step35's chained heads; 0 with one head)."""

    head_rows = 0

    def __init__(self, rt, n_embd: int, max_tokens: int):
        n = max_tokens
        for name in ("ids", "pos", "seq", "out_idx", "hid_idx"):
            setattr(self, name, rt.alloc(4 * n, f"mtp.{name}"))
        self.x = rt.alloc(4 * n * n_embd, "mtp.x")
        self.h = rt.alloc(4 * (n + 1) * n_embd, "mtp.h")  # its own output hidden; row n stays zero
        self.hn = rt.alloc(4 * n * n_embd, "mtp.hn")
        cl.enqueue_fill_buffer(rt.queue, self.h, np.zeros(1, np.float32), 0, self.h.size)

    @staticmethod
    def bytes_needed(n_embd: int, max_tokens: int) -> int:
        return 4 * 5 * max_tokens + 4 * n_embd * (3 * max_tokens + 1)


class MtpView:
    """The trunk's step buffers with the batch inputs (ids, pos, seq, out_idx) of the MTP batch: the decoder
    layer's kernels read those from the record they are given."""

    def __init__(self, buf, mbuf: MtpBuffers):
        self.__dict__.update(buf.__dict__)
        self.ids, self.pos, self.seq, self.out_idx = mbuf.ids, mbuf.pos, mbuf.seq, mbuf.out_idx


def mtp_step(rt, mm, w: dict, b: str, n_embd: int, eps: float, buf, mbuf: MtpBuffers, hidden_src,
             max_tokens: int, max_outputs: int, layer: Callable[[object, object], list[Launch]]) -> list[Launch]:
    """The MTP block over up to max_tokens (token, hidden) pairs: token mbuf.ids[i] at position mbuf.pos[i]
    of sequence mbuf.seq[i], hidden = row mbuf.hid_idx[i] of hidden_src. `layer(view, x)` builds the
    architecture's decoder layer over residual x reading the batch inputs from view. Leaves the block's
    normed output in mbuf.h and draft logits / argmax of the rows mbuf.out_idx in buf.logits / buf.argmax."""
    n, e = max_tokens, n_embd
    view = MtpView(buf, mbuf)
    embd = w.get(b + "nextn.embed_tokens.weight", w["token_embd.weight"])
    L = mm.get_rows(embd, mbuf.ids, view.cur, n)
    L += norm.rms_norm(rt, view.cur, view.cur, w[b + "nextn.enorm.weight"], e, 1, eps, n)
    L += mm.matmul(w[b + "nextn.eh_proj.weight.e"], view.cur, mbuf.x, n)
    L += elementwise.gather_rows(rt, hidden_src, mbuf.hid_idx, mbuf.hn, e, n, token_var=VAR_N_TOKENS)
    L += norm.rms_norm(rt, mbuf.hn, mbuf.hn, w[b + "nextn.hnorm.weight"], e, 1, eps, n)
    L += mm.matmul(w[b + "nextn.eh_proj.weight.h"], mbuf.hn, mbuf.x, n, accumulate=True)
    L += layer(view, mbuf.x)
    head_norm = w.get(b + "nextn.shared_head_norm.weight", w["output_norm.weight"])
    L += norm.rms_norm(rt, mbuf.x, mbuf.h, head_norm, e, 1, eps, n)
    head = mtp_head_weight(w, b)
    L += output_head(rt, mm, head, mbuf.h, mbuf.out_idx, view.x_out, view.logits, view.argmax, e, head.n_rows,
                     max_outputs, n)
    return L


DRAFT_HEAD = "nextn.draft_head"  # a block's reduced head (spec/draft_vocab.py), made by the runner


def mtp_head_weight(w: dict, b: str):
    """The output matrix of MTP block b: its reduced draft head when the runner made one (its rows are
    runner.draft_ids), else shared_head_head, else the trunk's output."""
    return w.get(b + DRAFT_HEAD, w.get(b + "nextn.shared_head_head.weight", w["output.weight"]))


def mtp_head_source(mf, b: str) -> str:
    """The GGUF tensor the output matrix of MTP block b comes from."""
    for name in (b + "nextn.shared_head_head.weight", "output.weight"):
        if mf.has(name):
            return name
    return "token_embd.weight"  # tied embeddings
