"""A model step as a plan: prepared kernels enqueued in order, only the changing arguments set per run.

`make_plan` gives the native plan (nextn._launch.Plan: a Cython loop over the OpenCL C API, no Python per
launch) or `PyPlan`, the same thing in plain pyopencl, kept for parity tests and for comparison in
`nextn bench`. Both also offer enqueue_write / enqueue_read / finish for the few bytes of per-step I/O.
"""

import statistics
import time

import numpy as np
import pyopencl as cl

from nextn.ops.launch import N_VARS, Launch


class PyPlan:
    """The plain-pyopencl plan: same semantics as nextn._launch.Plan."""

    def __init__(self, queue: cl.CommandQueue, launches: list[Launch]):
        self.queue = queue
        self.launches = list(launches)
        self._last = [dict() for _ in self.launches]  # arg index -> last value set

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    def run(self, vars) -> None:
        for launch, last in zip(self.launches, self._last):
            for arg_index, var_index in launch.dyn_args:
                v = int(vars[var_index])
                if last.get(arg_index) != v:
                    launch.kernel.set_arg(arg_index, np.int32(v))
                    last[arg_index] = v
            cl.enqueue_nd_range_kernel(self.queue, launch.kernel, launch.global_size(vars), launch.local)


def py_enqueue_write(queue, buffer, array: np.ndarray, offset_bytes: int = 0) -> None:
    """Non-blocking write; the caller keeps `array` alive until the queue has finished."""
    cl.enqueue_copy(queue, buffer, array, dst_offset=offset_bytes, is_blocking=False)


def py_enqueue_read(queue, buffer, array: np.ndarray, offset_bytes: int = 0) -> None:
    cl.enqueue_copy(queue, array, buffer, src_offset=offset_bytes, is_blocking=True)


def py_finish(queue) -> None:
    queue.finish()


try:
    from nextn import _launch as _native
except ImportError as e:  # the extension is built by `pip install -e .`; say so instead of a bare ImportError
    _native = None
    _native_error = e

if _native is not None:
    enqueue_write = _native.enqueue_write
    enqueue_read = _native.enqueue_read
    finish = _native.finish
else:
    enqueue_write, enqueue_read, finish = py_enqueue_write, py_enqueue_read, py_finish


def make_plan(queue, launches, native: bool = True):
    if native:
        if _native is None:
            raise ImportError(f"nextn._launch is not built ({_native_error}); run `pip install -e .`")
        return _native.Plan(queue, launches)
    return PyPlan(queue, launches)


def measure_launch_overhead(rt, n_launches: int = 500, repeats: int = 7) -> dict[str, float]:
    """Host seconds per launch of a trivial kernel, native vs pyopencl plan (medians)."""
    prg = cl.Program(rt.ctx, "__kernel void kernel_nop(__global int *x, int n) { if (get_global_id(0) == 0 && n < 0) x[0] = n; }").build()
    buf = rt.alloc(64, "overhead.probe")
    launches = []
    for _ in range(n_launches):
        k = cl.Kernel(prg, "kernel_nop")
        k.set_args(buf, np.int32(0))
        launches.append(Launch(k, (1,), (0,), None, [(1, 0)]))
    vars = np.zeros(N_VARS, np.int32)
    out = {}
    for name, plan in (("native", make_plan(rt.queue, launches, True)), ("pyopencl", PyPlan(rt.queue, launches))):
        times = []
        for i in range(repeats):
            vars[0] = i  # a changed dyn arg each run, as a real step has
            rt.queue.finish()
            t0 = time.perf_counter()
            plan.run(vars)
            times.append(time.perf_counter() - t0)
            rt.queue.finish()
        out[name] = statistics.median(times) / n_launches
    return out
