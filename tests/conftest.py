"""Shared test helpers: one OpenCL runtime per session, and a plain-pyopencl runner for Launch lists."""

import numpy as np
import pyopencl as cl
import pytest


def kv_device(a: np.ndarray) -> np.ndarray:
    """A KV cache held by position, [n_seq, rows, n_head_kv, ...] (as the references index it), in the device's
    head-major layout [n_seq, n_head_kv, rows, ...] (kernels/kv_types.h: KV_ROW)."""
    return np.ascontiguousarray(np.swapaxes(a, 1, 2))


def kv_host(a: np.ndarray) -> np.ndarray:
    """The inverse of kv_device (the same swap of axes 1 and 2): a cache read back from the device, by
    position."""
    return kv_device(a)


@pytest.fixture(scope="session")
def rt():
    from nextn.cl.runtime import Runtime

    return Runtime()


def run_launches(rt, launches, vars) -> None:
    """Run prepared launches in order (the plain-pyopencl path; the Cython plan does the same from C)."""
    for launch in launches:
        if not launch.runs(vars):
            continue
        for arg_index, var_index in launch.dyn_args:
            launch.kernel.set_arg(arg_index, np.int32(vars[var_index]))
        cl.enqueue_nd_range_kernel(rt.queue, launch.kernel, launch.global_size(vars), launch.local)
    rt.queue.finish()
