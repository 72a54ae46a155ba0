"""kernels/norm.cl against numpy.

Tolerance: the kernel sums squares in float32 (in a different order than numpy): rtol 1e-5, atol 1e-6
against a float64 reference.
"""

import numpy as np
import pyopencl as cl
import pytest

from conftest import run_launches
from nextn.cl.launch import VAR_N_OUTPUTS, VAR_N_TOKENS
from nextn.ops.norm import rms_norm


def ref_rms_norm(x, weight, eps):
    x = x.astype(np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def read(rt, buf, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


@pytest.mark.parametrize(
    "row_len, rows_per_token, n_tokens, with_weight",
    [
        (1024, 1, 1, True),  # token norm, decode
        (1024, 1, 5, True),
        (1030, 1, 64, False),  # row_len % 4 != 0: the scalar tail
        (128, 16, 5, True),  # qwen3 per-head q norm
        (64, 8, 64, True),  # per-head k norm, head_dim 64
    ],
)
def test_rms_norm(rt, row_len, rows_per_token, n_tokens, with_weight):
    rng = np.random.default_rng(row_len + n_tokens)
    max_tokens = n_tokens + 3  # rows past vars[token_var] must stay untouched
    x = (rng.standard_normal((max_tokens * rows_per_token, row_len)) * 3).astype(np.float32)
    w = rng.standard_normal(row_len).astype(np.float32) if with_weight else None
    eps = 1e-6
    bx = rt.upload(x, "x")
    by = rt.upload(np.full_like(x, 7.0), "y")
    bw = rt.upload(w, "w") if with_weight else None
    run_launches(rt, rms_norm(rt, bx, by, bw, row_len, rows_per_token, eps, max_tokens), [n_tokens, 0, 0, 0])
    y = read(rt, by, x.shape)
    n = n_tokens * rows_per_token
    np.testing.assert_allclose(y[:n], ref_rms_norm(x[:n], w, eps), rtol=1e-5, atol=1e-6)
    assert (y[n:] == 7.0).all()


def test_rms_norm_other_work_group_size(rt, monkeypatch):
    """The GPU's 64 work-items per row (the default here depends on the device)."""
    from nextn.ops import norm

    monkeypatch.setattr(norm, "work_group", lambda rt: 64)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 1030)).astype(np.float32)
    bx, by = rt.upload(x, "x"), rt.alloc(x.nbytes, "y")
    run_launches(rt, rms_norm(rt, bx, by, None, 1030, 1, 1e-6, 5), [5, 0, 0, 0])
    np.testing.assert_allclose(read(rt, by, x.shape), ref_rms_norm(x, None, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_in_place_on_output_rows(rt):
    """y is x, sized by VAR_N_OUTPUTS (the output norm on the gathered rows)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    w = rng.standard_normal(256).astype(np.float32)
    bx, bw = rt.upload(x, "x"), rt.upload(w, "w")  # kernels do not own their buffers: keep them referenced
    launches = rms_norm(rt, bx, bx, bw, 256, 1, 1e-5, 8, token_var=VAR_N_OUTPUTS)
    run_launches(rt, launches, [8, 3, 0, 0])
    y = read(rt, bx, x.shape)
    np.testing.assert_allclose(y[:3], ref_rms_norm(x[:3], w, 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[3:], x[3:])


def test_rms_norm_refuses_a_buffer_too_small(rt):
    small = rt.alloc(4 * 100, "small")
    with pytest.raises(ValueError, match="bytes"):
        rms_norm(rt, small, small, None, 64, 2, 1e-6, 1, token_var=VAR_N_TOKENS)
