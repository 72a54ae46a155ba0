"""kernels/select.cl against numpy: argmax must equal numpy.argmax exactly (ties -> lowest index), top-k
must equal a stable descending sort (ids and values exactly). Both scan paths are exercised: the per-device
default and explicit shapes (CONTIGUOUS 0 is the GPU's strided scan; WG > 1 runs the merge tree)."""


import numpy as np
import pyopencl as cl
import pytest

from conftest import run_launches
from nextn.ops.select import argmax, top_k

SHAPES = [None, {"WG": 64, "CONTIGUOUS": 0}, {"WG": 8, "CONTIGUOUS": 1}]


def read(rt, buf, shape, dtype):
    out = np.empty(shape, dtype)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


def logits_with_ties(rng, rows, n_vocab):
    x = rng.standard_normal((rows, n_vocab)).astype(np.float32)
    # row 0: the max twice, far apart (different work-items on every shape)
    x[0, [min(7, n_vocab - 3), n_vocab - 2]] = 10.0
    if rows > 1:  # row 1: the max twice inside one float4, and once more later
        x[1, [n_vocab // 2 + 1, n_vocab // 2 + 2, n_vocab - 1]] = 9.0
    if rows > 2:  # row 2: all equal
        x[2] = 0.5
    if rows > 3:  # row 3: all -inf (numpy says 0)
        x[3] = -np.inf
    if rows > 4:  # row 4: the max only in the n_vocab % 4 tail
        x[4, -1] = 11.0
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_vocab, rows", [(151936, 5), (1001, 6), (7, 2)])
def test_argmax(rt, shape, n_vocab, rows):
    rng = np.random.default_rng(n_vocab)
    x = logits_with_ties(rng, rows, n_vocab)
    bx, bo = rt.upload(x, "logits"), rt.alloc(4 * rows, "ids")
    run_launches(rt, argmax(rt, bx, bo, n_vocab, rows, shape=shape), [rows, rows, 0, 0])
    np.testing.assert_array_equal(read(rt, bo, rows, np.int32), x.argmax(axis=1))


def stable_top_k(x, k):
    ids = np.argsort(-x, axis=1, kind="stable")[:, :k]  # equal values keep ascending index order
    return ids, np.take_along_axis(x, ids, axis=1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_vocab, k, rows", [(151936, 40, 2), (151936, 64, 1), (1001, 8, 3), (64, 64, 1)])
def test_top_k(rt, shape, n_vocab, k, rows):
    rng = np.random.default_rng(n_vocab + k)
    x = rng.standard_normal((rows, n_vocab)).astype(np.float32)
    if rows > 1:
        x[1] = np.round(x[1], 1)  # many ties
    bx = rt.upload(x, "logits")
    bi, bv = rt.alloc(4 * rows * k, "ids"), rt.alloc(4 * rows * k, "vals")
    run_launches(rt, top_k(rt, bx, bi, bv, n_vocab, k, rows, shape=shape), [rows, rows, 0, 0])
    ids, vals = stable_top_k(x, k)
    np.testing.assert_array_equal(read(rt, bi, (rows, k), np.int32), ids)
    np.testing.assert_array_equal(read(rt, bv, (rows, k), np.float32), vals)


def test_top_k_rejects_k_over_64(rt):
    buf = rt.alloc(4 * 1000, "x")
    with pytest.raises(ValueError, match="k=65"):
        top_k(rt, buf, buf, buf, 1000, 65, 1)


@pytest.mark.slow
def test_select_timing(rt):
    """Prints device time of argmax and top-k over one row of 151936 logits (median of 20)."""
    n_vocab = 151936
    x = np.random.default_rng(0).standard_normal((1, n_vocab)).astype(np.float32)
    bx, bi, bv = rt.upload(x, "logits"), rt.alloc(4 * 64, "ids"), rt.alloc(4 * 64, "vals")
    queue = cl.CommandQueue(rt.ctx, rt.device, properties=cl.command_queue_properties.PROFILING_ENABLE)
    for name, launches in (("argmax", argmax(rt, bx, bi, n_vocab, 1)),
                           ("top_k 40", top_k(rt, bx, bi, bv, n_vocab, 40, 1))):
        (launch,) = launches
        gsize = launch.global_size([1, 1, 0, 0])
        cl.enqueue_nd_range_kernel(queue, launch.kernel, gsize, launch.local).wait()
        times = []
        for _ in range(20):
            ev = cl.enqueue_nd_range_kernel(queue, launch.kernel, gsize, launch.local)
            ev.wait()
            times.append((ev.profile.end - ev.profile.start) * 1e-9)
        t = float(np.median(times))
        print(f"\n{name} over {n_vocab} logits: {t * 1e3:.3f} ms ({4 * n_vocab / t / 1e9:.1f} GB/s)")
