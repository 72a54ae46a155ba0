"""The native (Cython) plan against the plain-pyopencl plan: same buffers, same grid sizes as
Launch.global_size, dyn args set only when they change, named errors, per-step host I/O, launch overhead."""

import gc

import numpy as np
import pyopencl as cl
import pytest

from nextn import _launch
from nextn.cl import plan as planmod
from nextn.cl.plan import PyPlan, make_plan, measure_launch_overhead
from nextn.errors import CLCallError
from nextn.cl.launch import N_VARS, VAR_N_OUTPUTS, VAR_N_SPLITS, VAR_N_TOKENS, Launch

WG = 16  # work-group width of kernel_rowsum (a power of two: tree reduction)

SRC = f"""
__kernel void kernel_axpy(__global float *y, __global const float *x, const float a, const int n) {{
    int i = get_global_id(0);
    if (i < n) y[i] += a * x[i];
}}

// out[row] = scale * sum(x[row, :]); one work-group of WG x ROWS items per ROWS rows. The grid's row count
// is rounded up to ROWS, so rows past n_rows take part in the barriers but neither load nor store.
__kernel void kernel_rowsum(__global float *out, __global const float *x, const int n_cols, const int n_rows,
                            const float scale) {{
    __local float part[2][{WG}];
    int lid = get_local_id(0), lrow = get_local_id(1), row = get_global_id(1);
    float acc = 0.0f;
    if (row < n_rows)
        for (int c = lid; c < n_cols; c += {WG}) acc += x[row * n_cols + c];
    part[lrow][lid] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = {WG} / 2; s > 0; s >>= 1) {{
        if (lid < s) part[lrow][lid] += part[lrow][lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }}
    if (lid == 0 && row < n_rows) out[row] = scale * part[lrow][0];
}}

// records the grid it ran on: global sizes, then local sizes, of dimensions 0..2
__kernel void kernel_mark(__global int *out, const int unused) {{
    if (get_global_id(0) == 0 && get_global_id(1) == 0 && get_global_id(2) == 0)
        for (int d = 0; d < 3; d++) {{ out[d] = get_global_size(d); out[3 + d] = get_local_size(d); }}
}}
"""

N = 100  # length of the axpy vectors and rows of the rowsum matrix
N_COLS = 37


@pytest.fixture(scope="module")
def prg(rt):
    return cl.Program(rt.ctx, SRC).build()


def vars_of(n_tokens, n_outputs=0):
    v = np.zeros(N_VARS, np.int32)
    v[VAR_N_TOKENS], v[VAR_N_OUTPUTS] = n_tokens, n_outputs
    return v


def step_launches(rt, prg, bufs):
    """y += 1*x; y += 2*x; y += 3*x over the first n_tokens, then out = 0.5 * rowsum(y reshaped) over the
    first n_outputs rows: a chain in which each launch reads what the one before wrote."""
    y, x, m, out = bufs
    launches = []
    for s in range(3):
        k = cl.Kernel(prg, "kernel_axpy")
        k.set_args(y, x, np.float32(s + 1), np.int32(0))
        launches.append(Launch(k, (0,), (1,), (8,), [(3, VAR_N_TOKENS)], name=f"axpy{s}"))
    k = cl.Kernel(prg, "kernel_axpy")  # m += 1*y: the rowsum's input depends on the axpys
    k.set_args(m, y, np.float32(1), np.int32(N))
    launches.append(Launch(k, (N,), (0,), None, [], name="fold"))
    k = cl.Kernel(prg, "kernel_rowsum")
    k.set_args(out, m, np.int32(N_COLS), np.int32(0), np.float32(0.5))
    launches.append(Launch(k, (WG, 0), (0, 1), (WG, 2), [(3, VAR_N_OUTPUTS)], VAR_N_OUTPUTS, name="rowsum"))
    return launches


def step_buffers(rt, x, m0):
    return (rt.upload(np.zeros(N, np.float32), "plan.y"), rt.upload(x, "plan.x"), rt.upload(m0, "plan.m"),
            rt.upload(np.zeros(N, np.float32), "plan.out"))


def read(rt, buf, n=N, dtype=np.float32):
    out = np.empty(n, dtype)
    planmod.enqueue_read(rt.queue, buf, out)
    return out


def test_native_and_pyopencl_plans_give_identical_buffers(rt, prg):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(N).astype(np.float32)
    m0 = rng.standard_normal(N * N_COLS).astype(np.float32)
    nat_bufs, py_bufs = step_buffers(rt, x, m0), step_buffers(rt, x, m0)
    native = make_plan(rt.queue, step_launches(rt, prg, nat_bufs), native=True)
    py = make_plan(rt.queue, step_launches(rt, prg, py_bufs), native=False)
    assert isinstance(native, _launch.Plan) and isinstance(py, PyPlan)
    assert native.n_launches == py.n_launches == 5
    y, m, out = np.zeros(N, np.float32), m0.astype(np.float64), np.zeros(N)
    for n_tok, n_out in ((5, 1), (37, 4), (0, 0), (100, 7), (37, 4), (37, 4)):
        vars = vars_of(n_tok, n_out)
        native.run(vars)
        py.run(vars)
        for a in (1, 2, 3):
            y[:n_tok] += np.float32(a) * x[:n_tok]
        m[:N] += y
        out[:n_out] = 0.5 * m.reshape(N, N_COLS)[:n_out].sum(axis=1)
        for nb, pb in zip(nat_bufs, py_bufs, strict=True):
            np.testing.assert_array_equal(read(rt, nb, nb.size // 4), read(rt, pb, pb.size // 4))
        np.testing.assert_allclose(read(rt, nat_bufs[0]), y, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(read(rt, nat_bufs[3]), out, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_dyn_arg_is_set_only_when_it_changes(rt, prg, native):
    x = np.arange(N, dtype=np.float32)
    xb, yb = rt.upload(x, "dyn.x"), rt.upload(np.zeros(N, np.float32), "dyn.y")
    k = cl.Kernel(prg, "kernel_axpy")
    k.set_args(yb, xb, np.float32(1), np.int32(N))  # a value set before the plan exists is never trusted
    plan = make_plan(rt.queue, [Launch(k, (N,), (0,), None, [(3, VAR_N_TOKENS)])], native=native)
    expect = np.zeros(N, np.float32)
    for n in (5, 9, 9):
        plan.run(vars_of(n))
        expect[:n] += x[:n]
    np.testing.assert_array_equal(read(rt, yb), expect)
    # Behind the plan's back the argument becomes 0; the plan still believes it holds 9, so a run with 9
    # does not set it again (the kernel sees n = 0 and adds nothing), and a run with 4 does.
    k.set_arg(3, np.int32(0))
    plan.run(vars_of(9))
    np.testing.assert_array_equal(read(rt, yb), expect)
    plan.run(vars_of(4))
    expect[:4] += x[:4]
    np.testing.assert_array_equal(read(rt, yb), expect)


def test_kernels_shared_between_launches_and_plans(rt, prg):
    """One kernel whose dyn arg follows n_tokens in one launch and n_outputs in another, and plans of both
    kinds over the same kernel: the record of what was set is per kernel, so no launch reuses a stale
    value."""
    x = np.arange(N, dtype=np.float32)
    xb, yb = rt.upload(x, "share.x"), rt.upload(np.zeros(N, np.float32), "share.y")
    k = cl.Kernel(prg, "kernel_axpy")
    k.set_args(yb, xb, np.float32(1), np.int32(0))
    launches = [
        Launch(k, (N,), (0,), None, [(3, VAR_N_TOKENS)]),
        Launch(k, (N,), (0,), None, [(3, VAR_N_OUTPUTS)]),
    ]
    assert (_launch.DYN_CACHE_ATTR, _launch.DYN_UNSET) == (planmod.DYN_CACHE_ATTR, planmod.DYN_UNSET)
    plans = [make_plan(rt.queue, launches, native=True), make_plan(rt.queue, launches[:1], native=False)]
    expect = np.zeros(N, np.float32)
    for i, (n_tok, n_out) in enumerate(((10, 3), (10, 3), (20, 20), (7, 3), (7, 3))):
        plan = plans[i % 2]
        plan.run(vars_of(n_tok, n_out))
        expect[:n_tok] += x[:n_tok]
        if plan.n_launches == 2:
            expect[:n_out] += x[:n_out]
    np.testing.assert_array_equal(read(rt, yb), expect)


GRID_CASES = [
    ((10,), (0,), None, VAR_N_TOKENS),
    ((0,), (3,), None, VAR_N_TOKENS),  # zero tokens: one work-item
    ((-4,), (8,), None, VAR_N_TOKENS),
    ((3, 1), (5, 0), (4, 1), VAR_N_TOKENS),
    ((0, 2), (7, 1), (16, 2), VAR_N_OUTPUTS),
    ((64,), (0,), (64,), VAR_N_TOKENS),
    ((-4,), (8,), (16,), VAR_N_TOKENS),  # rounds a negative size up: at least one work-group
    ((5, 3, 0), (0, 0, 1), (1, 3, 2), VAR_N_TOKENS),
    ((2, 1, 1), (1, 2, 3), None, VAR_N_OUTPUTS),
]


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"{c[0]}+{c[1]}*v{c[3]}/{c[2]}")
def test_grid_sizes_match_launch_global_size(rt, prg, case):
    const, per_token, local, scale_var = case
    buf = rt.alloc(64, "grid.mark")
    for n in (0, 1, 6, 33):
        vars = vars_of(n, n // 2 + 1)
        seen = []
        for native in (True, False):
            k = cl.Kernel(prg, "kernel_mark")
            k.set_args(buf, np.int32(0))
            launch = Launch(k, const, per_token, local, scale_var=scale_var)
            make_plan(rt.queue, [launch], native=native).run(vars)
            out = read(rt, buf, 6, np.int32)
            seen.append((tuple(out[: len(const)]), tuple(out[3 : 3 + len(const)])))
        want = launch.global_size(vars)
        assert seen[0][0] == seen[1][0] == want, (case, n)
        if local:  # without one the driver picks the work-group size
            assert seen[0][1] == seen[1][1] == local
            assert all(g % lo == 0 for g, lo in zip(want, local, strict=True))


@pytest.mark.parametrize("native", [True, False])
def test_grid_vars_and_run_if(rt, prg, native):
    """A dimension may follow its own step variable (attention's splits), and a launch may run only while a
    variable is at least some value (the splits' combine launch): both plans as Launch says."""
    buf = rt.alloc(64, "grid.vars")
    k = cl.Kernel(prg, "kernel_mark")
    k.set_args(buf, np.int32(0))
    per_dim = Launch(k, (0, 3, 0), (2, 0, 1), (2, 1, 1), grid_vars=(VAR_N_TOKENS, VAR_N_TOKENS, VAR_N_SPLITS))
    gated = Launch(k, (7,), (0,), None, run_if=(VAR_N_SPLITS, 2))
    for n, splits in ((1, 1), (5, 4), (3, 0)):
        vars = vars_of(n)
        vars[VAR_N_SPLITS] = splits
        make_plan(rt.queue, [per_dim], native=native).run(vars)
        assert tuple(read(rt, buf, 3, np.int32)) == per_dim.global_size(vars) == (2 * n, 3, max(splits, 1))
        planmod.enqueue_write(rt.queue, buf, np.zeros(6, np.int32))
        make_plan(rt.queue, [gated], native=native).run(vars)
        assert read(rt, buf, 1, np.int32)[0] == (7 if splits >= 2 else 0) and gated.runs(vars) == (splits >= 2)
    for bad in (Launch(k, (1, 1), (0, 0), None, grid_vars=(0,)), Launch(k, (1,), (0,), None, run_if=(-1, 2))):
        with pytest.raises(ValueError, match="launch 0"):
            make_plan(rt.queue, [bad], native=native)
    plan = make_plan(rt.queue, [Launch(k, (1,), (0,), None, grid_vars=(5,))], native=native)
    with pytest.raises(IndexError):
        plan.run(np.zeros(4, np.int32))  # reads step variable 5


@pytest.mark.parametrize("native", [True, False])
def test_failing_calls_raise_cl_call_error_with_call_name(rt, prg, native):
    buf = rt.alloc(64, "bad.mark")
    # a local size the device cannot take (above its maximum work-group size)
    too_big = int(rt.device.max_work_group_size) * 2
    k = cl.Kernel(prg, "kernel_mark")
    k.set_args(buf, np.int32(0))
    launches = [Launch(k, (1,), (0,), None, name="ok"), Launch(k, (too_big,), (0,), (too_big,), name="huge")]
    plan = make_plan(rt.queue, launches, native=native)
    with pytest.raises(CLCallError) as e:
        plan.run(vars_of(1))
    assert e.value.call == "clEnqueueNDRangeKernel"
    assert e.value.status == cl.status_code.INVALID_WORK_GROUP_SIZE
    assert e.value.launch_index == 1 and e.value.launch_name == "huge"
    assert "INVALID_WORK_GROUP_SIZE" in str(e.value) and "launch 1 (huge)" in str(e.value)

    # an int32 dyn arg bound to a pointer argument
    k = cl.Kernel(prg, "kernel_mark")
    k.set_args(buf, np.int32(0))
    plan = make_plan(rt.queue, [Launch(k, (1,), (0,), None, [(0, VAR_N_TOKENS)], name="ptr")], native=native)
    with pytest.raises(CLCallError) as e:
        plan.run(vars_of(1))
    assert e.value.call == "clSetKernelArg" and e.value.status == cl.status_code.INVALID_ARG_SIZE

    # a kernel whose static arguments were never set
    k = cl.Kernel(prg, "kernel_axpy")
    plan = make_plan(rt.queue, [Launch(k, (8,), (0,), None, [(3, VAR_N_TOKENS)])], native=native)
    with pytest.raises(CLCallError) as e:
        plan.run(vars_of(1))
    assert e.value.call == "clEnqueueNDRangeKernel" and e.value.status == cl.status_code.INVALID_KERNEL_ARGS
    rt.queue.finish()


@pytest.mark.parametrize("native", [True, False])
def test_inconsistent_launches_are_refused_when_the_plan_is_built(rt, prg, native):
    k = cl.Kernel(prg, "kernel_axpy")
    bad = [
        Launch(k, (8, 1), (0,), None),  # dimensions disagree
        Launch(k, (8,), (0,), (0,)),  # zero local size
        Launch(k, (8,), (0,), (8, 1)),  # local has another rank
        Launch(k, (8,), (0,), None, [(4, VAR_N_TOKENS)]),  # kernel_axpy has 4 arguments
        Launch(k, (1, 1, 1, 1), (0, 0, 0, 0), None),
    ]
    for launch in bad:
        with pytest.raises(ValueError, match="launch 0"):
            make_plan(rt.queue, [launch], native=native)
    k.set_args(rt.alloc(16, "short.y"), rt.alloc(16, "short.x"), np.float32(1), np.int32(0))
    plan = make_plan(rt.queue, [Launch(k, (4,), (0,), None, [(3, 2)])], native=native)
    with pytest.raises(IndexError):
        plan.run(np.zeros(2, np.int32))  # reads step variable 2


IO = [
    (planmod.enqueue_write, planmod.enqueue_read, planmod.finish),
    (planmod.py_enqueue_write, planmod.py_enqueue_read, planmod.py_finish),
]


@pytest.mark.parametrize("io", IO, ids=["native", "pyopencl"])
def test_write_read_round_trip(rt, io):
    write, read_, finish = io
    assert planmod.enqueue_write is _launch.enqueue_write  # the native functions are the exported ones
    buf = rt.alloc(4096, "io")
    write(rt.queue, buf, np.arange(8, dtype=np.int32), offset_bytes=16)
    # a temporary: the module keeps it alive until the transfer is done
    write(rt.queue, buf, np.arange(100, 108, dtype=np.int32) * np.int32(2), offset_bytes=64)
    gc.collect()
    out = np.zeros(8, np.int32)
    read_(rt.queue, buf, out, offset_bytes=16)
    np.testing.assert_array_equal(out, np.arange(8))
    read_(rt.queue, buf, out, offset_bytes=64)
    np.testing.assert_array_equal(out, np.arange(100, 108) * 2)
    for i in range(300):  # more writes than the module holds between finishes: it drains the queue itself
        write(rt.queue, buf, np.full(4, i, np.int32), offset_bytes=16 * (i % 200))
    finish(rt.queue)
    big = np.zeros(800, np.int32)
    read_(rt.queue, buf, big)
    assert big[4 * 99] == 299 and big[4 * 100] == 100
    with pytest.raises(ValueError):
        read_(rt.queue, buf, np.zeros((4, 4), np.int32)[:, ::2])
    with pytest.raises(ValueError):
        write(rt.queue, buf, np.zeros((4, 4), np.int32)[:, ::2])
    ro = np.zeros(4, np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        read_(rt.queue, buf, ro)
    with pytest.raises(CLCallError) as e:
        read_(rt.queue, buf, out, offset_bytes=4096)  # past the end of the buffer
    assert e.value.call == "clEnqueueReadBuffer"


def test_native_launch_overhead_is_lower(rt):
    t = measure_launch_overhead(rt, n_launches=200, repeats=5)
    print(f"\nhost time per launch (run only): native {t['native'] * 1e6:.2f} us, "
          f"pyopencl {t['pyopencl'] * 1e6:.2f} us; run + finish: native {t['native_step'] * 1e6:.2f} us, "
          f"pyopencl {t['pyopencl_step'] * 1e6:.2f} us")
    assert t["native"] < t["pyopencl"]
