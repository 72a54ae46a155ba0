"""The native (Cython) plan against the plain-pyopencl plan: same results, same grid sizes, named errors."""

import numpy as np
import pyopencl as cl
import pytest

from nextn.cl import plan as planmod
from nextn.cl.plan import make_plan, measure_launch_overhead
from nextn.errors import CLCallError
from nextn.ops.launch import N_VARS, VAR_N_OUTPUTS, VAR_N_TOKENS, Launch

SRC = """
__kernel void kernel_axpy(__global float *y, __global const float *x, const float a, const int n) {
    int i = get_global_id(0);
    if (i < n) y[i] += a * x[i];
}
__kernel void kernel_mark(__global int *out, const int width) {
    // records the grid it ran on: out[0] = global size 0, out[1] = global size 1, out[2] = local size 0
    if (get_global_id(0) == 0 && get_global_id(1) == 0) {
        out[0] = get_global_size(0); out[1] = get_global_size(1); out[2] = get_local_size(0);
    }
}
"""


@pytest.fixture(scope="module")
def prg(rt):
    return cl.Program(rt.ctx, SRC).build()


def axpy_launches(rt, prg, y, x, n_steps):
    out = []
    for s in range(n_steps):
        k = cl.Kernel(prg, "kernel_axpy")
        k.set_args(y, x, np.float32(s + 1), np.int32(0))
        out.append(Launch(k, (0,), (1,), (8,), [(3, VAR_N_TOKENS)], name=f"axpy{s}"))
    return out


@pytest.mark.parametrize("native", [True, False])
def test_plan_runs_in_order_with_dynamic_count(rt, prg, native):
    x = np.arange(100, dtype=np.float32)
    y_host = np.zeros(100, np.float32)
    xb, yb = rt.upload(x, "x"), rt.upload(y_host, "y")
    plan = make_plan(rt.queue, axpy_launches(rt, prg, yb, xb, 3), native=native)
    assert plan.n_launches == 3
    vars = np.zeros(N_VARS, np.int32)
    expect = np.zeros(100, np.float32)
    for n in (5, 37, 0, 100, 37):
        vars[VAR_N_TOKENS] = n
        plan.run(vars)
        expect[:n] += (1 + 2 + 3) * x[:n]
    out = np.empty(100, np.float32)
    planmod.enqueue_read(rt.queue, yb, out)
    np.testing.assert_array_equal(out, expect)


def test_native_and_pyopencl_grids_match_launch_global_size(rt, prg):
    buf = rt.alloc(16, "mark")
    cases = [
        Launch(None, (10, 3), (0, 0), None),
        Launch(None, (3, 1), (5, 0), (4, 1)),
        Launch(None, (0, 2), (7, 1), (16, 2), scale_var=VAR_N_OUTPUTS),
        Launch(None, (64,), (0,), (64,)),
    ]
    for case in cases:
        while len(case.global_const) < 2:
            case = Launch(None, case.global_const + (1,), case.global_per_token + (0,),
                          (case.local + (1,)) if case.local else None, scale_var=case.scale_var)
        for n in (0, 1, 6, 33):
            vars = np.array([n, n // 2 + 1, 0, 0], np.int32)
            seen = []
            for native in (True, False):
                k = cl.Kernel(prg, "kernel_mark")
                k.set_args(buf, np.int32(0))
                launch = Launch(k, case.global_const, case.global_per_token, case.local, scale_var=case.scale_var)
                make_plan(rt.queue, [launch], native=native).run(vars)
                out = np.zeros(4, np.int32)
                planmod.enqueue_read(rt.queue, buf, out)
                seen.append(tuple(out[:2]))
            assert seen[0] == seen[1] == launch.global_size(vars), (case, n)


def test_bad_launch_raises_named_error(rt, prg):
    k = cl.Kernel(prg, "kernel_mark")
    k.set_args(rt.alloc(16, "m"), np.int32(0))
    # a local size that the device cannot take (far above its maximum work-group size)
    too_big = int(rt.device.max_work_group_size) * 2
    plan = make_plan(rt.queue, [Launch(k, (too_big,), (0,), (too_big,))], native=True)
    with pytest.raises(CLCallError) as e:
        plan.run(np.zeros(N_VARS, np.int32))
    assert "clEnqueueNDRangeKernel" in str(e.value) and "launch 0" in str(e.value)


def test_unset_kernel_argument_is_reported(rt, prg):
    k = cl.Kernel(prg, "kernel_axpy")  # no static args set
    plan = make_plan(rt.queue, [Launch(k, (8,), (0,), None, [(3, 0)])], native=True)
    with pytest.raises(CLCallError):
        plan.run(np.zeros(N_VARS, np.int32))


def test_write_read_round_trip_with_offset(rt):
    buf = rt.alloc(64, "rt")
    a = np.arange(8, dtype=np.int32)
    planmod.enqueue_write(rt.queue, buf, a, offset_bytes=16)
    out = np.zeros(8, np.int32)
    planmod.enqueue_read(rt.queue, buf, out, offset_bytes=16)
    np.testing.assert_array_equal(out, a)
    with pytest.raises(ValueError):
        planmod.enqueue_read(rt.queue, buf, np.zeros((4, 4), np.int32)[:, ::2])


def test_native_launch_overhead_is_lower(rt):
    t = measure_launch_overhead(rt, n_launches=200, repeats=5)
    print(f"host time per launch: native {t['native'] * 1e6:.2f} us, pyopencl {t['pyopencl'] * 1e6:.2f} us")
    assert t["native"] < t["pyopencl"]
