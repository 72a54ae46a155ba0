"""A model step as a plan: prepared kernels enqueued in order, only the changing arguments set per run.

`make_plan` gives the native plan (nextn._launch.Plan: a Cython loop over the OpenCL C API, no Python per
launch) or `PyPlan`, the same thing in plain pyopencl, kept for parity tests and for comparison in
`nextn bench`. Both modules also offer enqueue_write / enqueue_read / finish for the few bytes of per-step
I/O (token ids, positions, argmax results); the names exported here are the native ones when the extension
is built, and `py_enqueue_write` / `py_enqueue_read` / `py_finish` are the pyopencl twins.

Semantics shared by both plan kinds:
- `run(vars)` walks the launches in order; for each it sets the dyn args whose step variable differs from
  the value the kernel last got from any plan (the record lives on the kernel object, attribute
  `_nextn_dyn_args`, so kernels shared between plans stay correct), computes `Launch.global_size(vars)`,
  and enqueues. No wait and no flush: the caller's blocking read or `finish` ends the step.
- A plan snapshots its launches when built; it resets the kernel's record for its own dyn args then, so a
  value set directly with `kernel.set_arg` before is never taken as current (one set after is not seen).
- A failing OpenCL call raises CLCallError(call, status) with `.launch_index` / `.launch_name` set and a
  message that names the status and the launch; launches before it stay enqueued.
- Writes are non-blocking and the module keeps each host array alive until the queue is finished or a
  blocking read on it returns, so callers may pass temporaries (but must not modify them before then).
"""

import statistics
import time

import numpy as np
import pyopencl as cl

from nextn.errors import CLCallError
from nextn.cl.launch import N_VARS, VAR_N_TOKENS, Launch

DYN_UNSET = np.iinfo(np.int64).min  # same marker and attribute as pyx/_launch.pyx
DYN_CACHE_ATTR = "_nextn_dyn_args"


def _dyn_cache(kernel, reset_args=()) -> np.ndarray:
    """The per-kernel record of dyn-arg values, shared with the native plan (see the module docstring)."""
    cache = getattr(kernel, DYN_CACHE_ATTR, None)
    if cache is None:
        cache = np.full(int(kernel.num_args), DYN_UNSET, np.int64)
        setattr(kernel, DYN_CACHE_ATTR, cache)
    for a in reset_args:
        cache[a] = DYN_UNSET
    return cache


def _check_launch(index: int, launch: Launch, num_args: int) -> None:
    where = f"launch {index} ({launch.name or 'unnamed'})"
    dims = len(launch.global_const)
    if not 1 <= dims <= 3 or len(launch.global_per_token) != dims:
        raise ValueError(f"{where}: global_const and global_per_token must both have 1 to 3 dimensions")
    if launch.local is not None and (len(launch.local) != dims or any(int(x) <= 0 for x in launch.local)):
        raise ValueError(f"{where}: local size {launch.local} must be positive and have {dims} dimensions")
    if launch.scale_var < 0:
        raise ValueError(f"{where}: scale_var {launch.scale_var} is negative")
    if launch.grid_vars is not None and (len(launch.grid_vars) != dims or min(launch.grid_vars) < 0):
        raise ValueError(f"{where}: grid_vars {launch.grid_vars} must name {dims} step variables")
    if launch.run_if is not None and launch.run_if[0] < 0:
        raise ValueError(f"{where}: run_if reads negative step variable {launch.run_if[0]}")
    for arg_index, var_index in launch.dyn_args:
        if not 0 <= arg_index < num_args:
            raise ValueError(f"{where}: dyn arg index {arg_index} out of range (kernel has {num_args} args)")
        if var_index < 0:
            raise ValueError(f"{where}: dyn arg {arg_index} reads negative step variable {var_index}")


def _check_queue(queue) -> None:
    # Launch i+1 reads what launch i wrote, and a blocking read stands for "everything before it is done":
    # both hold only on an in-order queue.
    if queue.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE:
        raise ValueError("plans and per-step I/O need an in-order command queue")


def _launch_error(err: cl.Error, index: int, name: str) -> CLCallError:
    """CLCallError whose message also names the status and the launch (`.call` stays the bare name)."""
    out = CLCallError(err.routine, err.code)
    out.launch_index, out.launch_name = index, name
    status_name = cl.status_code.to_string(err.code, "unknown")
    out.args = (f"{out} ({status_name}) at launch {index} ({name or 'unnamed'})",)
    return out


class PyPlan:
    """The plain-pyopencl plan: same interface and semantics as nextn._launch.Plan, one Python call per
    argument set and per enqueue (what the native plan exists to avoid)."""

    def __init__(self, queue: cl.CommandQueue, launches: list[Launch]):
        _check_queue(queue)
        self.queue = queue
        self._steps = []  # (the kernel's dyn cache, a snapshot of the launch)
        self._n_vars_needed = 0
        for i, launch in enumerate(launches):
            if launch.kernel is None:
                raise ValueError(f"launch {i} ({launch.name or 'unnamed'}) has no kernel")
            _check_launch(i, launch, int(launch.kernel.num_args))
            snap = Launch(launch.kernel, tuple(launch.global_const), tuple(launch.global_per_token),
                          None if launch.local is None else tuple(launch.local), list(launch.dyn_args),
                          launch.scale_var, launch.name, grid_vars=launch.grid_vars, run_if=launch.run_if)
            cache = _dyn_cache(launch.kernel, [a for a, _ in launch.dyn_args])
            self._steps.append((cache, snap))
            needed = [snap.scale_var + 1, *(v + 1 for _, v in snap.dyn_args), *(v + 1 for v in snap.grid_vars or ()),
                      snap.run_if[0] + 1 if snap.run_if else 0]
            self._n_vars_needed = max(self._n_vars_needed, *needed)

    @property
    def n_launches(self) -> int:
        return len(self._steps)

    def run(self, vars) -> None:
        if len(vars) < self._n_vars_needed:
            raise IndexError(f"plan reads {self._n_vars_needed} step variables; {len(vars)} given")
        queue = self.queue
        for i, (cache, launch) in enumerate(self._steps):
            kernel = launch.kernel
            if not launch.runs(vars):
                continue
            try:
                for arg_index, var_index in launch.dyn_args:
                    v = int(vars[var_index])
                    if cache[arg_index] != v:
                        kernel.set_arg(arg_index, np.int32(v))
                        cache[arg_index] = v
                cl.enqueue_nd_range_kernel(queue, kernel, launch.global_size(vars), launch.local)
            except cl.Error as e:
                raise _launch_error(e, i, launch.name) from e


# Events of non-blocking writes still in flight, per queue (int_ptr -> list). pyopencl's NannyEvent holds
# the host array and, when dropped, waits for its transfer: keeping it here is what makes the write
# non-blocking, and it is released (already complete) at finish or after a blocking read.
_held: dict[int, list] = {}
_MAX_HELD = 256


def _release_held(queue) -> None:
    held = _held.get(queue.int_ptr)
    if held:
        held.clear()


def py_enqueue_write(queue, buffer, array: np.ndarray, offset_bytes: int = 0) -> None:
    """Non-blocking write; the module holds `array` until the queue is finished or a blocking read returns."""
    if not array.flags.c_contiguous:
        raise ValueError("enqueue_write needs a C-contiguous array")
    if array.nbytes == 0:
        return
    held = _held.get(queue.int_ptr)
    if held is None:
        _check_queue(queue)
        held = _held[queue.int_ptr] = []
    try:
        held.append(cl.enqueue_copy(queue, buffer, array, dst_offset=offset_bytes, is_blocking=False))
    except cl.Error as e:
        raise CLCallError(e.routine, e.code) from e
    if len(held) > _MAX_HELD:
        py_finish(queue)


def py_enqueue_read(queue, buffer, array: np.ndarray, offset_bytes: int = 0) -> None:
    """Blocking read into a writeable C-contiguous array; waits for everything queued before it."""
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError("enqueue_read needs a writeable C-contiguous array")
    if array.nbytes == 0:
        return
    try:
        cl.enqueue_copy(queue, array, buffer, src_offset=offset_bytes, is_blocking=True)
    except cl.Error as e:
        raise CLCallError(e.routine, e.code) from e
    _release_held(queue)


def py_finish(queue) -> None:
    try:
        queue.finish()
    except cl.Error as e:
        raise CLCallError(e.routine, e.code) from e
    _release_held(queue)


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
    """nextn._launch.Plan when native (ImportError if the extension is not built), else PyPlan."""
    if native:
        if _native is None:
            raise ImportError(f"nextn._launch is not built ({_native_error}); run `pip install -e .`")
        return _native.Plan(queue, launches)
    return PyPlan(queue, launches)


NOP_SOURCE = """
__kernel void kernel_nop(__global int *x, const int n) {
    // never true for the n the probe passes; keeps the argument and the store from being optimized out
    if (get_global_id(0) == 0 && n < 0) x[0] = n;
}
"""


def measure_launch_overhead(
    rt, n_launches: int = 500, repeats: int = 7, change_args: bool = True
) -> dict[str, float]:
    """Host seconds per launch for a plan of `n_launches` trivial one-work-item kernels, native vs pyopencl.

    With `change_args` each run changes the one dyn arg of every launch (the worst case: a set plus an
    enqueue per launch); without, runs repeat the same variables, as decode steps at a steady batch size
    do (enqueues only). Medians over `repeats` runs of:
      "native" / "pyopencl":               plan.run() alone, the queue drained before each run
      "native_step" / "pyopencl_step":     plan.run() then finish(), i.e. until the device is done too
    """
    prg = cl.Program(rt.ctx, NOP_SOURCE).build()
    buf = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE, 64)  # not rt.alloc: a probe is not model memory
    launches = []
    for _ in range(n_launches):
        k = cl.Kernel(prg, "kernel_nop")
        k.set_args(buf, np.int32(0))
        launches.append(Launch(k, (1,), (0,), None, [(1, VAR_N_TOKENS)], name="nop"))
    vars = np.zeros(N_VARS, np.int32)
    out = {}
    for name, native in (("native", True), ("pyopencl", False)):
        plan = make_plan(rt.queue, launches, native)
        plan.run(vars)  # warm-up: first sets, driver-side lazy work
        finish(rt.queue)
        runs, steps = [], []
        for i in range(repeats):
            vars[VAR_N_TOKENS] = i + 1 if change_args else 0
            t0 = time.perf_counter()
            plan.run(vars)
            t1 = time.perf_counter()
            finish(rt.queue)
            t2 = time.perf_counter()
            runs.append(t1 - t0)
            steps.append(t2 - t0)
        out[name] = statistics.median(runs) / n_launches
        out[name + "_step"] = statistics.median(steps) / n_launches
    return out
