"""Kernel wrappers only the tests use: the standalone RoPE (kernels/rope.cl here), the reference the fused
qkv_prep kernel is checked against, and SwiGLU over separate gate / up buffers (kernels/swiglu.cl). They are
built from tests/kernels through the same runtime as the engine's kernels, so they share its context and
buffers. Also upload_gate_up_experts: separate gate and up expert tensors uploaded as one fused weight."""

import math
from pathlib import Path

import numpy as np

from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.ops.moe import _upload_expert_parts
from nextn.ops.norm import check_buffer
from nextn.ops.weights import DeviceWeight

KERNELS = Path(__file__).resolve().parent / "kernels"
LOCAL = 64


def rope(rt, x, positions, n_head: int, head_dim: int, n_rot: int, neox: bool, freq_base: float,
         freq_scale: float, max_tokens: int, row_stride: int | None = None) -> list[Launch]:
    """Rotate the first n_rot dims of each head of x [n_tokens, n_head, head_dim] (in place).

    positions: int32 [max_tokens]. neox=False rotates pairs (2i, 2i+1) (llama), True (i, i + n_rot/2)
    (qwen2/qwen3). row_stride: floats between tokens, default n_head * head_dim.
    """
    if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
        raise ValueError(f"rope: n_rot={n_rot} must be even and in 1..head_dim={head_dim}")
    row_stride = n_head * head_dim if row_stride is None else row_stride
    if row_stride < n_head * head_dim:
        raise ValueError(f"rope: row_stride={row_stride} < n_head * head_dim = {n_head * head_dim}")
    check_buffer(x, 4 * ((max_tokens - 1) * row_stride + n_head * head_dim), "rope x")
    check_buffer(positions, 4 * max_tokens, "rope positions")
    k = rt.kernel(rt.build("rope.cl", directory=KERNELS), "kernel_rope_neox" if neox else "kernel_rope_norm")
    # float64 on the host, one float32 rounding for the kernel (ggml computes powf(base, -2/n_rot) in float)
    log2_theta_scale = -2.0 * math.log2(freq_base) / n_rot
    k.set_args(x, positions, np.int32(n_head), np.int32(head_dim), np.int32(row_stride), np.int32(n_rot),
               np.float32(freq_scale), np.float32(log2_theta_scale))
    return [Launch(k, (n_rot // 2, 0), (0, 1), None, [], VAR_N_TOKENS, name="rope")]


def swiglu(rt, gate, up, y, n: int, max_tokens: int) -> list[Launch]:
    """y = silu(gate) * up over n_tokens * n floats, silu(x) = x / (1 + exp(-x)) (y may alias gate or up)."""
    if n <= 0:
        raise ValueError(f"swiglu: n={n}")
    for b in (gate, up, y):
        check_buffer(b, 4 * max_tokens * n, "swiglu")
    k = rt.kernel(rt.build("swiglu.cl", directory=KERNELS), "kernel_swiglu")
    k.set_args(gate, up, y, np.int32(n), np.int32(0))
    # one float4 per work-item; the grid is rounded up to LOCAL, so the kernel bounds itself by n * n_tokens
    return [Launch(k, (0,), (-(-n // 4),), (LOCAL,), [(4, VAR_N_TOKENS)], VAR_N_TOKENS, name="swiglu")]


def upload_gate_up_experts(
    rt, raw_gate: np.ndarray, raw_up: np.ndarray, qtype, n_expert: int, n_ff_exp: int, n_embd: int, name: str
) -> DeviceWeight:
    """ffn_gate_exps and ffn_up_exps of one type as one weight in ffn_gate_up_exps' layout (expert e: its
    n_ff_exp gate rows, then its n_ff_exp up rows), for moe_ffn(..., gate_exps=this, up_exps=None): one
    expert-indexed launch instead of two, and a decode step streams each expert's gate|up in one pass
    (measured on PoCL, n_embd 1024, n_ff_exp 512, 8 of 64 Q8_0 experts: 0.20 ms instead of 2 x 0.116 ms)."""
    return _upload_expert_parts(rt, [raw_gate, raw_up], qtype, n_expert, [n_ff_exp, n_ff_exp], n_embd, name)
