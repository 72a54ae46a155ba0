"""kernels/elementwise.cl against numpy.

Tolerance: add is exact; swiglu uses the device exp (<= 3 ulp in OpenCL's full-precision math) and one
division: rtol 1e-5 against float64. gather_rows is an exact copy.
"""

import numpy as np
import pyopencl as cl
import pytest
from conftest import run_launches
from ops_testonly import swiglu

from nextn.cl.launch import VAR_N_OUTPUTS
from nextn.ops import elementwise
from nextn.ops.elementwise import add, gather_rows


def read(rt, buf, shape, dtype=np.float32):
    out = np.empty(shape, dtype)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


@pytest.mark.parametrize("n, n_tokens", [(1024, 1), (1024, 64), (1030, 5), (3, 1)])
def test_add_in_place(rt, n, n_tokens):
    rng = np.random.default_rng(n)
    max_tokens = n_tokens + 2
    a = rng.standard_normal((max_tokens, n)).astype(np.float32)
    b = rng.standard_normal((max_tokens, n)).astype(np.float32)
    ba, bb = rt.upload(a, "a"), rt.upload(b, "b")  # kernels do not own their buffers: keep them referenced
    run_launches(rt, add(rt, ba, bb, ba, n, max_tokens), [n_tokens, 0, 0, 0])
    y = read(rt, ba, a.shape)
    np.testing.assert_array_equal(y[:n_tokens], a[:n_tokens] + b[:n_tokens])
    np.testing.assert_array_equal(y[n_tokens:], a[n_tokens:])  # past n_tokens * n: untouched


def test_add_scaled_by_outputs(rt):
    a = np.arange(40, dtype=np.float32).reshape(4, 10)
    ba, by = rt.upload(a, "a"), rt.upload(np.zeros_like(a), "y")
    run_launches(rt, add(rt, ba, ba, by, 10, 4, token_var=VAR_N_OUTPUTS), [4, 2, 0, 0])
    y = read(rt, by, a.shape)
    np.testing.assert_array_equal(y[:2], 2 * a[:2])
    assert (y[2:] == 0).all()


@pytest.mark.parametrize("n, n_tokens", [(3072, 1), (3072, 5), (1030, 5)])
def test_swiglu(rt, n, n_tokens):
    rng = np.random.default_rng(n + n_tokens)
    g = (rng.standard_normal((n_tokens, n)) * 4).astype(np.float32)
    g[0, :6] = [-100.0, 100.0, -88.5, 0.0, -1e-30, 30.0]  # exp(-g) overflowing must give silu = -0, not NaN
    u = rng.standard_normal((n_tokens, n)).astype(np.float32)
    bg, bu = rt.upload(g, "g"), rt.upload(u, "u")
    run_launches(rt, swiglu(rt, bg, bu, bg, n, n_tokens), [n_tokens, 0, 0, 0])  # in place on gate
    y = read(rt, bg, g.shape)
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g64 / (1.0 + np.exp(-g64)) * u
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("row_len", [1024, 1027])  # float4 and scalar variants
def test_gather_rows(rt, row_len):
    rng = np.random.default_rng(row_len)
    x = rng.standard_normal((16, row_len)).astype(np.float32)
    idx = np.array([15, 0, 7, 7, 3, 0, 0, 0], np.int32)
    bx, bi = rt.upload(x, "x"), rt.upload(idx, "idx")
    by = rt.upload(np.zeros((8, row_len), np.float32), "y")
    launches = gather_rows(rt, bx, bi, by, row_len, 8)
    run_launches(rt, launches, [16, 5, 0, 0])
    y = read(rt, by, (8, row_len))
    np.testing.assert_array_equal(y[:5], x[idx[:5]])
    assert (y[5:] == 0).all()


def test_gather_rows_with_no_rows_reads_nothing(rt):
    """n_outputs = 0 still launches one row of work-items; a stale idx[0] must not be followed."""
    bx = rt.upload(np.ones((4, 64), np.float32), "x")
    bi = rt.upload(np.array([1 << 30], np.int32), "idx")
    by = rt.upload(np.zeros((1, 64), np.float32), "y")
    run_launches(rt, gather_rows(rt, bx, bi, by, 64, 1), [4, 0, 0, 0])
    assert (read(rt, by, (1, 64)) == 0).all()


def test_swiglu_fused(rt):
    rng = np.random.default_rng(0)
    n, n_ff = 5, 48
    gu = rng.standard_normal((n, 2 * n_ff)).astype(np.float32)
    b, y = rt.upload(gu, "gu"), rt.alloc(4 * n * n_ff, "y")
    run_launches(rt, elementwise.swiglu_fused(rt, b, y, n_ff), np.array([n, 0, 0, 0], np.int32))
    out = np.empty((n, n_ff), np.float32)
    cl.enqueue_copy(rt.queue, out, y)
    g, u = gu[:, :n_ff].astype(np.float64), gu[:, n_ff:].astype(np.float64)
    np.testing.assert_allclose(out, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
