"""kernels/copy.cl and ops/bandwidth.py: the copy is exact, and the probe returns a plausible figure."""

import math

import numpy as np
import pyopencl as cl
import pytest

from nextn.ops.bandwidth import VECTORS, copy_bandwidths, copy_launch, measure_bandwidth


@pytest.mark.parametrize("variant", list(VECTORS))
def test_copy_is_exact(rt, variant):
    n = 1 << 20
    src = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)
    bsrc, bdst = rt.upload(src, "src"), rt.upload(np.zeros_like(src), "dst")
    kernel, gsize, lsize = copy_launch(rt, bsrc, bdst, n, variant)
    cl.enqueue_nd_range_kernel(rt.queue, kernel, gsize, lsize)
    dst = np.empty_like(src)
    cl.enqueue_copy(rt.queue, dst, bdst)
    np.testing.assert_array_equal(dst, src)


def test_copy_rejects_ragged_size(rt):
    buf = rt.alloc(1 << 16, "buf")
    with pytest.raises(ValueError, match="multiple"):
        copy_launch(rt, buf, buf, 1000)


def test_measure_bandwidth_small(rt):
    before = dict(rt.allocated)
    gbs = measure_bandwidth(rt, nbytes=8 << 20, repeats=2)
    assert math.isfinite(gbs) and 0.1 < gbs < 100_000
    assert rt.allocated == before  # scratch buffers stay out of the model's memory ledger


@pytest.mark.slow
def test_bandwidth_figure(rt):
    """Prints the device copy bandwidth (256 MiB, median of 5) of each variant."""
    for variant, gbs in copy_bandwidths(rt).items():
        print(f"\ncopy {variant}: {gbs:.1f} GB/s (read + write)")
