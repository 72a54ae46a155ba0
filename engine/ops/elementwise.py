"""Element-wise blocks (kernels/elementwise.cl): residual add, SwiGLU over gate|up, bias add, gathering the rows to
project."""

import numpy as np

from nextn.cl.launch import VAR_N_OUTPUTS, VAR_N_TOKENS, Launch
from nextn.ops.norm import check_buffer

LOCAL = 64


def _binary(rt, name: str, bufs, n: int, max_tokens: int, token_var: int) -> list[Launch]:
    if n <= 0:
        raise ValueError(f"{name}: n={n}")
    for b in bufs:
        check_buffer(b, 4 * max_tokens * n, name)
    k = rt.kernel(rt.build("elementwise.cl"), f"kernel_{name}")
    k.set_args(*bufs, np.int32(n), np.int32(0))
    # one float4 per work-item; the grid is rounded up to LOCAL, so the kernel bounds itself by n * n_tokens
    per_token = -(-n // 4)
    return [Launch(k, (0,), (per_token,), (LOCAL,), [(4, token_var)], token_var, name=name)]


def add(rt, a, b, y, n: int, max_tokens: int, token_var: int = VAR_N_TOKENS) -> list[Launch]:
    """y = a + b over vars[token_var] * n floats (y may alias a or b)."""
    return _binary(rt, "add", (a, b, y), n, max_tokens, token_var)


def gather_rows(rt, x, idx, y, row_len: int, max_rows: int, token_var: int = VAR_N_OUTPUTS) -> list[Launch]:
    """y[i] = x[idx[i]] for i < vars[token_var]; x, y float32 rows of row_len, idx int32 [max_rows]."""
    if row_len <= 0:
        raise ValueError(f"gather_rows: row_len={row_len}")
    check_buffer(y, 4 * max_rows * row_len, "gather_rows y")
    check_buffer(idx, 4 * max_rows, "gather_rows idx")
    vec = 4 if row_len % 4 == 0 else 1
    k = rt.kernel(rt.build("elementwise.cl"), f"kernel_gather_rows_f{vec}")
    k.set_args(x, idx, y, np.int32(row_len), np.int32(0))
    chunks = -(-(row_len // vec) // LOCAL) * LOCAL
    return [Launch(k, (chunks, 0), (0, 1), (LOCAL, 1), [(4, token_var)], token_var, name="gather_rows")]


def swiglu_fused(rt, gate_up, y, n_ff: int, limit: float = 0.0) -> list[Launch]:
    """y[t, i] = silu(gate_up[t, i]) * gate_up[t, n_ff + i]; gate_up float32 [n_tokens, 2 n_ff] (the gate|up
    projections side by side). limit > 0 (step35's SwiGLU limits): min(silu(gate), limit) * clamp(up, -limit,
    limit), as llama.cpp's build_ffn / build_moe_ffn."""
    if limit > 1e-6:  # llama.cpp's eps: smaller limits are "no limit"
        k = rt.kernel(rt.build("elementwise.cl"), "kernel_swiglu_clamp")
        k.set_args(gate_up, y, np.int32(n_ff), np.float32(limit), np.int32(0))
        return [Launch(k, (n_ff, 0), (0, 1), (LOCAL, 1), [(4, VAR_N_TOKENS)], VAR_N_TOKENS,
                       name="ffn_swiglu_limited")]
    k = rt.kernel(rt.build("elementwise.cl"), "kernel_swiglu_fused")
    k.set_args(gate_up, y, np.int32(n_ff), np.int32(0))
    # an explicit group: left to the driver, PoCL ran one work-item per group (0.13 ms for 3072 items)
    return [Launch(k, (n_ff, 0), (0, 1), (LOCAL, 1), [(3, VAR_N_TOKENS)], VAR_N_TOKENS, name="ffn_swiglu")]


def head_gate(rt, y, g, n_head: int, head_dim: int) -> list[Launch]:
    """y[t, h * head_dim + d] *= sigmoid(g[t, h]) for t < n_tokens: step35's head-wise attention gate; y
    float32 [n_tokens, n_head * head_dim], g float32 [n_tokens, n_head]."""
    k = rt.kernel(rt.build("elementwise.cl"), "kernel_head_gate")
    k.set_args(y, g, np.int32(head_dim), np.int32(n_head), np.int32(0))
    return [Launch(k, (n_head * head_dim, 0), (0, 1), (LOCAL, 1), [(4, VAR_N_TOKENS)], VAR_N_TOKENS,
                   name="attn_gated")]


def add_bias(rt, y, bias, width: int, max_tokens: int) -> list[Launch]:
    """y[t, i] += bias[i] for t < n_tokens; y float32 [max_tokens, width], bias float32 [width]."""
    if width <= 0:
        raise ValueError(f"add_bias: width={width}")
    check_buffer(y, 4 * max_tokens * width, "add_bias y")
    check_buffer(bias, 4 * width, "add_bias bias")
    k = rt.kernel(rt.build("elementwise.cl"), "kernel_add_bias")
    k.set_args(y, bias, np.int32(width), np.int32(0))
    return [Launch(k, (width, 0), (0, 1), (LOCAL, 1), [(3, VAR_N_TOKENS)], VAR_N_TOKENS, name="qkv_bias")]
