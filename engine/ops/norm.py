"""RMS norm of rows (kernels/norm.cl): the token norms of every layer and qwen3's per-head q/k norms."""

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_TOKENS, Launch


def work_group(rt) -> int:
    """Work-items per row. GPU: 64 (one row of n_embd = 1024 floats is 4 float4 chunks per work-item).
    PoCL runs a group's work-items in a loop on one core, so fewer is cheaper: 512 rows of 1024 took
    75 us at 16, 147 us at 64, 578 us at 256."""
    return 16 if rt.device.type & cl.device_type.CPU else 64


def check_buffer(buf, nbytes: int, what: str) -> None:
    """A plan that indexes past a buffer corrupts memory silently on most devices: refuse to build it."""
    if buf.size < nbytes:
        raise ValueError(f"{what}: buffer has {buf.size} bytes, the launch needs {nbytes}")


def rms_norm(rt, x, y, weight, row_len: int, rows_per_token: int, eps: float, max_tokens: int,
             token_var: int = VAR_N_TOKENS) -> list[Launch]:
    """y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for r < vars[token_var] * rows_per_token.

    x, y: float32 [max_tokens * rows_per_token, row_len] (y may be x); weight: float32 [row_len] or None.
    """
    if row_len <= 0 or rows_per_token <= 0:
        raise ValueError(f"rms_norm: row_len={row_len}, rows_per_token={rows_per_token}")
    need = 4 * max_tokens * rows_per_token * row_len
    check_buffer(x, need, "rms_norm x")
    check_buffer(y, need, "rms_norm y")
    wg = work_group(rt)
    prg = rt.build("norm.cl", {"WG": wg})
    if weight is None:
        k = rt.kernel(prg, "kernel_rms_norm_noweight")
        k.set_args(x, y, np.int32(row_len), np.float32(eps))
    else:
        check_buffer(weight, 4 * row_len, "rms_norm weight")
        k = rt.kernel(prg, "kernel_rms_norm")
        k.set_args(x, y, weight, np.int32(row_len), np.float32(eps))
    # one work-group per row: the grid is exactly n_rows * WG, so the kernel needs no row bound
    return [Launch(k, (0,), (wg * rows_per_token,), (wg,), [], token_var, name="rms_norm")]
