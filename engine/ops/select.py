"""Per-row argmax and top-k of logits on the device (kernels/select.cl): greedy decoding and draft
verification read back 4 bytes per row instead of a row of n_vocab floats."""

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_OUTPUTS, Launch
from nextn.ops.norm import check_buffer

MAX_K = 64


def _shape(rt, top_k: bool) -> dict:
    """Work-group shape per device kind (see the header of select.cl)."""
    if rt.device.type & cl.device_type.CPU:
        # PoCL runs a group's work-items one after another on one core, so contiguous spans. Measured on
        # 151936 logits (AVX-512 Xeon): argmax takes the same 0.04 ms for WG 1..64; top-k (k=40) 0.057 ms
        # at WG 1, 0.065 at 2, 0.11 at 8, 0.16 at 16: on one core the merge rounds only add work.
        return {"WG": 1 if top_k else 16, "CONTIGUOUS": 1}
    # GPU: wide groups, strided (coalesced) reads; top-k keeps WG lists of K in local memory (32 KiB at K=64)
    return {"WG": 64 if top_k else 256, "CONTIGUOUS": 0}


def _checked(shape: dict) -> dict:
    wg = shape["WG"]
    if wg < 1 or wg & (wg - 1):
        raise ValueError(f"select: WG={wg} must be a power of two (tree reduction)")
    return {"WG": wg, "CONTIGUOUS": int(bool(shape["CONTIGUOUS"]))}


def argmax(rt, logits, out_ids, n_vocab: int, max_rows: int, token_var: int = VAR_N_OUTPUTS, *,
           shape: dict | None = None) -> list[Launch]:
    """out_ids[r] = argmax(logits[r]) (int32; ties -> lowest index) for r < vars[token_var].

    `shape` ({"WG": .., "CONTIGUOUS": 0/1}) overrides the per-device choice, for tests and tuning.
    """
    check_buffer(logits, 4 * max_rows * n_vocab, "argmax logits")
    check_buffer(out_ids, 4 * max_rows, "argmax out_ids")
    d = _checked(shape or _shape(rt, top_k=False))
    k = rt.kernel(rt.build("select.cl", d), "kernel_argmax")
    k.set_args(logits, out_ids, np.int32(n_vocab))
    return [Launch(k, (0,), (d["WG"],), (d["WG"],), [], token_var, name="argmax")]


def top_k(rt, logits, out_ids, out_vals, n_vocab: int, k: int, max_rows: int,
          token_var: int = VAR_N_OUTPUTS, *, shape: dict | None = None) -> list[Launch]:
    """The k <= 64 largest logits per row, sorted descending (equal values by ascending id):
    out_ids int32 [rows, k], out_vals float32 [rows, k]. `shape` as for argmax."""
    if not 1 <= k <= min(MAX_K, n_vocab):
        raise ValueError(f"top_k: k={k} must be in 1..{min(MAX_K, n_vocab)}")
    check_buffer(logits, 4 * max_rows * n_vocab, "top_k logits")
    check_buffer(out_ids, 4 * max_rows * k, "top_k out_ids")
    check_buffer(out_vals, 4 * max_rows * k, "top_k out_vals")
    d = _checked(shape or _shape(rt, top_k=True))
    kern = rt.kernel(rt.build("select.cl", {**d, "K": k}), "kernel_top_k")
    kern.set_args(logits, out_ids, out_vals, np.int32(n_vocab))
    return [Launch(kern, (0,), (d["WG"],), (d["WG"],), [], token_var, name="top_k")]
