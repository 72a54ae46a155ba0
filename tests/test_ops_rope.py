"""tests/kernels/rope.cl (the standalone RoPE the fused qkv_prep is checked against) against a float64 numpy
transcription of ggml's rope loop (ggml-cpu ops.cpp rope_f32).

Tolerance: the kernel (like ggml) forms the angle in float32, so at position p it is off by a few float32
ulps of p radians (measured: <= 4.5e-8 * p * max|x| over 64 tokens at p < 4096); atol = 1e-5 +
1.5e-7 * max(p) * max|x|.
Dims past n_rot and floats between rows (row_stride) must be untouched exactly.
"""

import numpy as np
import pyopencl as cl
import pytest
from conftest import run_launches
from ops_testonly import rope


def ref_rope(x, pos, n_rot, neox, freq_base, freq_scale):
    """x: [n_tokens, n_head, head_dim] float64, rotated copy."""
    y = x.astype(np.float64).copy()
    theta_scale = freq_base ** (-2.0 / n_rot)
    i = np.arange(n_rot // 2)
    for t, p in enumerate(pos):
        theta = p * freq_scale * theta_scale**i  # ggml: theta_i = p * theta_scale^i, then * freq_scale
        c, s = np.cos(theta), np.sin(theta)
        if neox:
            i0, i1 = i, i + n_rot // 2
        else:
            i0, i1 = 2 * i, 2 * i + 1
        x0, x1 = x[t][:, i0].astype(np.float64), x[t][:, i1].astype(np.float64)
        y[t][:, i0] = x0 * c - x1 * s
        y[t][:, i1] = x0 * s + x1 * c
    return y


@pytest.mark.parametrize(
    "n_head, head_dim, n_rot, neox, freq_base, freq_scale, n_tokens, pad",
    [
        (16, 128, 128, True, 1e6, 1.0, 1, 0),  # qwen3 decode
        (16, 128, 128, True, 1e6, 1.0, 64, 0),
        (8, 64, 64, False, 10000.0, 1.0, 5, 0),  # llama
        (4, 64, 32, False, 10000.0, 0.25, 5, 0),  # partial rotation, linear scaling
        (4, 128, 64, True, 500000.0, 1.0, 5, 0),  # partial neox
        (2, 64, 64, True, 10000.0, 1.0, 5, 96),  # q inside a wider row (row_stride > n_head * head_dim)
    ],
)
def test_rope(rt, n_head, head_dim, n_rot, neox, freq_base, freq_scale, n_tokens, pad):
    rng = np.random.default_rng(head_dim * n_tokens + n_rot)
    row = n_head * head_dim + pad
    x = rng.standard_normal((n_tokens, row)).astype(np.float32)
    pos = rng.integers(0, 4096, n_tokens).astype(np.int32)
    pos[0] = 0  # position 0 must be the identity
    bx, bpos = rt.upload(x, "x"), rt.upload(pos, "pos")
    launches = rope(rt, bx, bpos, n_head, head_dim, n_rot, neox, freq_base, freq_scale, n_tokens,
                    row_stride=row if pad else None)
    run_launches(rt, launches, [n_tokens, 0, 0, 0])
    y = np.empty_like(x)
    cl.enqueue_copy(rt.queue, y, bx)
    heads = x[:, : n_head * head_dim].reshape(n_tokens, n_head, head_dim)
    ref = ref_rope(heads, pos, n_rot, neox, freq_base, freq_scale)
    got = y[:, : n_head * head_dim].reshape(n_tokens, n_head, head_dim)
    atol = 1e-5 + 1.5e-7 * pos.max() * np.abs(x).max()
    np.testing.assert_allclose(got[:, :, :n_rot], ref[:, :, :n_rot], rtol=0, atol=atol)
    np.testing.assert_array_equal(got[:, :, n_rot:], heads[:, :, n_rot:])
    np.testing.assert_array_equal(y[:, n_head * head_dim :], x[:, n_head * head_dim :])
    np.testing.assert_allclose(got[0], heads[0], rtol=0, atol=1e-7)


def test_rope_rejects_odd_n_rot(rt):
    buf = rt.alloc(4 * 64, "x")
    with pytest.raises(ValueError, match="n_rot"):
        rope(rt, buf, buf, 1, 64, 63, False, 10000.0, 1.0, 1)
