"""Matmul and get_rows kernels against numpy: gguf.quants.dequantize(raw) is the truth, x @ W.T in float64.

Tolerance: the kernels keep x in float32 (no int8 activation quantization) and accumulate in float32, so
the only error is float32 rounding of the sums. It is bounded relative to sum_c |w_rc| |x_tc| (the sum of
the absolute products, which is what rounding errors scale with): 1e-5 of it, about 170 float32 epsilons,
generous for rows of a few thousand products summed in chains of at most a few hundred. The mat-vec,
few-token and prompt variants must agree with each other far more tightly than with an int8-activation
kernel (which would be ~0.5% off per product), because greedy decoding compares their argmaxes.
"""

import numpy as np
import pyopencl as cl
import pytest
from conftest import run_launches
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq
from nextn.cl.launch import N_VARS, VAR_N_OUTPUTS, VAR_N_TOKENS
from nextn.ops.matmul import XSUM_COLS, MatmulOps, xsum_scratch_bytes
from nextn.ops.moe import upload_experts
from nextn.ops.weights import SUPPORTED_TYPES, TILE_ROWS, device_bytes, repack, upload_weight

T = GGMLQuantizationType
RTOL = 1e-5

# offsets of the half-precision fields (scales, offsets, mins) inside a block of the random-byte types
_HALVES = {
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def random_weight(qtype, n_rows: int, n_cols: int, rng) -> np.ndarray:
    """GGUF bytes uint8 (n_rows, row_bytes) of a random weight of the given type.

    Q8_0, Q4_0 and the float types go through gguf's quantizer (F16 with a few special halves in row 0).
    The other types are random bytes (every pattern of quants, high bits and packed scales is a valid
    block, and random bytes meet all of them) with small half scales of either sign, some of them
    subnormal, so that the kernels' integer half decoding meets every class of finite half.
    """
    qtype = T(qtype)
    if qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0):
        w = (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
        if qtype == T.F32:
            return w.view(np.uint8).reshape(n_rows, -1)
        raw = np.asarray(gq.quantize(w, qtype)).view(np.uint8).reshape(n_rows, -1).copy()
        if qtype == T.F16:  # every class of finite half: subnormals, zeros of both signs, the largest
            special = np.array([6e-8, -3e-6, 0.0, -0.0, 65504.0, -65504.0, 1e-4, 2.0], np.float16)
            raw[0, : min(raw.shape[1], special.nbytes)] = special.view(np.uint8)[: raw.shape[1]]
        return raw
    cols, bb = GGML_QUANT_SIZES[qtype]
    nb = n_cols // cols
    raw = rng.integers(0, 256, (n_rows, nb, bb), dtype=np.uint8)
    for off in _HALVES[qtype]:
        scale = rng.uniform(-0.01, 0.01, (n_rows, nb))
        scale[rng.random((n_rows, nb)) < 0.1] = 3e-6  # subnormal in half precision (< 6.1e-5)
        raw[:, :, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, -1)


def dequantize(raw: np.ndarray, qtype, n_rows: int, n_cols: int) -> np.ndarray:
    return gq.dequantize(raw, T(qtype)).reshape(n_rows, n_cols).astype(np.float64)


def reference(raw, qtype, x: np.ndarray) -> np.ndarray:
    n_rows = raw.shape[0]
    w = dequantize(raw, qtype, n_rows, x.shape[1])
    return x.astype(np.float64) @ w.T


def bound(raw, qtype, x: np.ndarray) -> np.ndarray:
    """sum_c |w_rc| |x_tc|: the scale of float32 rounding error of y[t, r]."""
    w = dequantize(raw, qtype, raw.shape[0], x.shape[1])
    return np.abs(x.astype(np.float64)) @ np.abs(w).T + 1e-30


def assert_close(y, ref, scale, what):
    err = np.abs(y - ref) / scale
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= RTOL, (
        f"{what}: error {err.max():.2e} x sum|w x| at {worst} (y {y[worst]}, ref {ref[worst]})"
    )


# the block-sum scratch of the prompt variant, as a runner sizes it (n_batch 128, the widest test weight)
XSUM_BYTES = xsum_scratch_bytes(128, 512)


@pytest.fixture(scope="module")
def mm(rt):
    return MatmulOps(rt, xsum_bytes=XSUM_BYTES)


def read(rt, buf, shape) -> np.ndarray:
    out = np.empty(shape, np.float32)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


def step_vars(n_tokens: int, n_outputs: int | None = None) -> list[int]:
    v = [0] * N_VARS
    v[VAR_N_TOKENS] = n_tokens
    v[VAR_N_OUTPUTS] = n_tokens if n_outputs is None else n_outputs
    return v


# (n_rows, n_cols) per type: n_rows not a multiple of 16 (a partial last tile) or of any work-group size;
# n_cols a multiple of the block (32 / 256), and for the float types not even a multiple of 4.
SHAPES = {
    T.Q8_0: [(100, 512), (33, 96)],
    T.Q4_0: [(100, 512), (19, 64)],
    T.Q4_1: [(100, 512), (19, 64)],
    T.Q5_0: [(100, 512), (19, 64)],
    T.Q5_1: [(100, 512), (19, 64)],
    T.IQ4_NL: [(100, 512), (19, 64)],
    T.IQ4_XS: [(70, 512), (21, 256)],
    T.Q2_K: [(70, 512), (21, 256)],
    T.Q3_K: [(70, 512), (21, 256)],
    T.Q4_K: [(70, 512), (21, 256)],
    T.Q5_K: [(70, 512), (21, 256)],
    T.Q6_K: [(70, 512), (21, 256)],
    T.F32: [(50, 100), (17, 64)],
    T.F16: [(50, 100), (17, 64)],
    T.BF16: [(50, 100), (17, 64)],
}
TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.value)


def test_supported_types():
    want = "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL IQ4_XS Q2_K Q3_K Q4_K Q5_K Q6_K"
    assert SUPPORTED_TYPES == {T[name] for name in want.split()}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_repack_is_a_permutation_of_the_file_bytes(qtype):
    rng = np.random.default_rng(1)
    n_rows, n_cols = SHAPES[qtype][0]
    raw = random_weight(qtype, n_rows, n_cols, rng)
    tiles = repack(raw, qtype, n_rows, n_cols)
    assert tiles.nbytes == device_bytes(qtype, n_rows, n_cols)
    pad = (-n_rows) % TILE_ROWS
    assert tiles.nbytes == (n_rows + pad) * raw.shape[1]
    # same multiset of bytes, plus the zero padding rows
    assert np.array_equal(
        np.bincount(tiles, minlength=256) - np.bincount(raw.reshape(-1), minlength=256),
        np.eye(256, dtype=np.int64)[0] * pad * raw.shape[1],
    )


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_all_variants(rt, mm, qtype):
    """Every shape, the three variants (mat-vec, few tokens, prompt) and n_tokens 1, 3, 16, 77."""
    rng = np.random.default_rng(qtype.value)
    for n_rows, n_cols in SHAPES[qtype]:
        raw = random_weight(qtype, n_rows, n_cols, rng)
        w = upload_weight(rt, raw, qtype, n_rows, n_cols, f"test.{qtype.name}")
        assert w.nbytes == device_bytes(qtype, n_rows, n_cols)
        x = rng.standard_normal((77, n_cols)).astype(np.float32)
        ref, scale = reference(raw, qtype, x), bound(raw, qtype, x)
        xb = rt.upload(x, "test.x")
        for max_tokens, runs in ((1, (1,)), (16, (3, 16)), (77, (77,))):
            yb = rt.alloc(4 * max_tokens * n_rows, "test.y")
            launches = mm.matmul(w, xb, yb, max_tokens)
            for n in runs:
                run_launches(rt, launches, step_vars(n))
                y = read(rt, yb, (max_tokens, n_rows))[:n]
                assert_close(
                    y, ref[:n], scale[:n], f"{qtype.name} [{n_rows}x{n_cols}] max_tokens={max_tokens} n={n}"
                )


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_id(rt, mm, qtype):
    """The expert-indexed entry of every type's kernel file (tests/test_ops_moe.py covers its contract in
    detail for Q8_0): experts with a partial last tile, an empty expert, the three chunkings (the prompt one
    with the rows' block sums computed once)."""
    rng = np.random.default_rng(20 + qtype.value)
    n_expert, (rows, n_cols) = 3, SHAPES[qtype][1]
    raw = random_weight(qtype, n_expert * rows, n_cols, rng)
    w = dequantize(raw, qtype, n_expert * rows, n_cols).reshape(n_expert, rows, n_cols)
    dw = upload_experts(rt, raw, qtype, n_expert, rows, n_cols, "test.experts")
    for max_tokens, counts in ((1, [1, 0, 1]), (16, [3, 0, 13]), (80, [70, 0, 9])):
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        n = int(bounds[-1])
        x = rng.standard_normal((n, n_cols)).astype(np.float32)
        xb, yb, bb = rt.upload(x, "test.x"), rt.alloc(4 * n * rows, "test.y"), rt.upload(bounds, "test.bounds")
        launches = mm.matmul_id(dw, xb, yb, bb, max_tokens, n)
        # the prompt chunking of a type with block mins reads the gathered rows' sums (kernel_x_block_sums)
        assert (launches[0].name == "x_block_sums") == (max_tokens == 80 and qtype in XSUM_COLS)
        run_launches(rt, launches, step_vars(max(counts)))
        we = w[np.repeat(np.arange(n_expert), counts)]
        ref = np.einsum("sc,src->sr", x.astype(np.float64), we)
        scale = np.einsum("sc,src->sr", np.abs(x).astype(np.float64), np.abs(we)) + 1e-30
        got = read(rt, yb, (n, rows))
        assert_close(got, ref, scale, f"{qtype.name} max_tokens={max_tokens}")
        if launches[0].name == "x_block_sums":  # the same bits as each tile summing x itself
            alone = rt.alloc(4 * n * rows, "test.y")
            run_launches(rt, MatmulOps(rt).matmul_id(dw, xb, alone, bb, max_tokens, n), step_vars(max(counts)))
            assert np.array_equal(read(rt, alone, (n, rows)), got), qtype.name


# the shortcuts' build only for types whose one-token tile differs (each build costs a kernel compile)
VARIANT_CASES = [(t, True) for t in TYPES] + [(t, False) for t in (T.Q8_0, T.Q4_0, T.Q6_K)]


@pytest.mark.parametrize("qtype,invariant", VARIANT_CASES, ids=lambda v: v.name if isinstance(v, T) else
                         ("invariant" if v else "shortcuts"))
def test_variants_are_batch_invariant(rt, qtype, invariant):
    """Batch invariance (kernels/quants.h, MM_BATCH_INVARIANT): the same token through the mat-vec plan, the
    few-token plan alone, inside 8-, 4-, 2- and 1-token groups and the prompt plan (which reads x's block sums
    from kernel_x_block_sums for the types in XSUM_COLS, where the others sum per tile) gives bit-identical
    rows; without it the variants agree to float rounding."""
    rng = np.random.default_rng(7)
    for n_rows, n_cols in SHAPES[qtype]:
        raw = random_weight(qtype, n_rows, n_cols, rng)
        x = rng.standard_normal((80, n_cols)).astype(np.float32)
        scale = bound(raw, qtype, x[:2])
        mm = MatmulOps(rt, batch_invariant=invariant, xsum_bytes=XSUM_BYTES)
        w = upload_weight(rt, raw, qtype, n_rows, n_cols, "test.w")
        xb = rt.upload(x, "test.x")
        rows = []
        # (plan's max_tokens, tokens in the step): token 0 alone, then in groups of 2, 4, 8 (+4 +1), and the
        # prompt plan; token 1 in a group of 2 and inside the 80-token prompt
        for n_max, n in ((1, 1), (16, 1), (16, 2), (16, 4), (16, 13), (80, 80), (80, 3)):
            y = rt.alloc(4 * n_max * n_rows, "test.y")
            launches = mm.matmul(w, xb, y, n_max)
            sums = [launch.name for launch in launches] == ["x_block_sums", launches[-1].name]
            assert sums == (n_max == 80 and qtype in XSUM_COLS), f"{qtype.name}: {[x.name for x in launches]}"
            run_launches(rt, launches, step_vars(n))
            rows.append(read(rt, y, (n_max, n_rows))[:2])
        token0 = [r[0] for r in rows]
        token1 = [rows[2][1], rows[5][1]]
        if invariant:
            for i, r in enumerate(token0[1:]):
                assert np.array_equal(r, token0[0]), f"{qtype.name} {n_rows}x{n_cols}: variant {i + 1} differs"
            assert np.array_equal(*token1), f"{qtype.name} {n_rows}x{n_cols}: token 1 differs"
        else:
            for r in token0[1:]:
                assert np.max(np.abs(r - token0[0]) / scale[0]) < 1e-6


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_K, T.BF16], ids=lambda t: t.name)
def test_matmul_accumulate(rt, mm, qtype):
    rng = np.random.default_rng(3)
    n_rows, n_cols = SHAPES[qtype][1]
    raw = random_weight(qtype, n_rows, n_cols, rng)
    w = upload_weight(rt, raw, qtype, n_rows, n_cols, "test.w")
    for max_tokens, n in ((1, 1), (16, 5), (70, 70)):
        x = rng.standard_normal((max_tokens, n_cols)).astype(np.float32)
        y0 = rng.standard_normal((max_tokens, n_rows)).astype(np.float32)
        xb, yb = rt.upload(x, "test.x"), rt.upload(y0, "test.y")
        run_launches(rt, mm.matmul(w, xb, yb, max_tokens, accumulate=True), step_vars(n))
        y = read(rt, yb, (max_tokens, n_rows))
        ref = y0[:n] + reference(raw, qtype, x[:n])
        assert_close(y[:n], ref, bound(raw, qtype, x[:n]) + np.abs(y0[:n]), f"accumulate n={n}")
        assert np.array_equal(y[n:], y0[n:]), "rows past n_tokens must be left alone"


def test_matmul_output_rows_only(rt, mm):
    """token_var=VAR_N_OUTPUTS: the grid follows n_outputs, not n_tokens; later rows stay untouched."""
    rng = np.random.default_rng(4)
    n_rows, n_cols = 100, 512
    raw = random_weight(T.Q8_0, n_rows, n_cols, rng)
    w = upload_weight(rt, raw, T.Q8_0, n_rows, n_cols, "test.w")
    x = rng.standard_normal((16, n_cols)).astype(np.float32)
    sentinel = np.full((16, n_rows), 7.0, np.float32)
    xb, yb = rt.upload(x, "test.x"), rt.upload(sentinel, "test.y")
    run_launches(rt, mm.matmul(w, xb, yb, 16, token_var=VAR_N_OUTPUTS), step_vars(12, n_outputs=3))
    y = read(rt, yb, (16, n_rows))
    assert_close(y[:3], reference(raw, T.Q8_0, x[:3]), bound(raw, T.Q8_0, x[:3]), "n_outputs rows")
    assert np.all(y[3:] == 7.0)


def test_matmul_zero_tokens_writes_nothing(rt, mm):
    rng = np.random.default_rng(5)
    raw = random_weight(T.Q4_0, 40, 64, rng)
    w = upload_weight(rt, raw, T.Q4_0, 40, 64, "test.w")
    xb = rt.upload(rng.standard_normal((4, 64)).astype(np.float32), "test.x")
    yb = rt.upload(np.full((4, 40), 3.0, np.float32), "test.y")
    run_launches(rt, mm.matmul(w, xb, yb, 4), step_vars(0))
    assert np.all(read(rt, yb, (4, 40)) == 3.0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_get_rows(rt, mm, qtype):
    rng = np.random.default_rng(10 + qtype.value)
    n_rows, n_cols = SHAPES[qtype][0]
    raw = random_weight(qtype, n_rows, n_cols, rng)
    w = upload_weight(rt, raw, qtype, n_rows, n_cols, "test.w")
    table = dequantize(raw, qtype, n_rows, n_cols).astype(np.float32)
    ids = np.array([0, n_rows - 1, 5, 5, 17, n_rows, -1, 3, 1], np.int32)  # repeats, the last row, bad ids
    n = len(ids) - 1  # one slot past n_tokens: must stay untouched
    idb = rt.upload(ids, "test.ids")
    sentinel = np.full((len(ids), n_cols), 9.0, np.float32)
    yb = rt.upload(sentinel, "test.y")
    run_launches(rt, mm.get_rows(w, idb, yb, len(ids)), step_vars(n))
    y = read(rt, yb, (len(ids), n_cols))
    for t in range(n):
        want = table[ids[t]] if 0 <= ids[t] < n_rows else np.zeros(n_cols, np.float32)
        np.testing.assert_allclose(
            y[t], want, rtol=1e-6, atol=1e-6 * np.abs(table).max(), err_msg=f"token {t} id {ids[t]}"
        )
    assert np.all(y[n] == 9.0)


def test_rejects_bad_weights(rt, mm):
    with pytest.raises(ValueError, match="not supported"):
        device_bytes(T.IQ2_XXS, 16, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        device_bytes(T.Q4_K, 16, 300)
    raw = np.zeros((16, 34), np.uint8)
    with pytest.raises(ValueError, match="expected uint8"):
        upload_weight(rt, raw, T.Q8_0, 16, 64, "test.bad")
    w = upload_weight(rt, raw, T.Q8_0, 16, 32, "test.w")
    small = rt.alloc(4 * 16, "test.small")
    with pytest.raises(ValueError, match="buffer"):
        mm.matmul(w, small, small, 2)


@pytest.mark.parametrize("qtype", [T.F16, T.Q5_1, T.Q4_K], ids=lambda t: t.name)
def test_integer_half_decoding(rt, qtype):
    """The fallback for compilers without clang's __fp16 vectors decodes halves with integer ops."""
    mm = MatmulOps(rt)
    mm.defines = {**mm.defines, "MM_NO_FP16_STORAGE": 1}
    rng = np.random.default_rng(11)
    n_rows, n_cols = SHAPES[qtype][0]
    raw = random_weight(qtype, n_rows, n_cols, rng)  # F16: with special halves; the others: subnormal scales
    w = upload_weight(rt, raw, qtype, n_rows, n_cols, "test.w")
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    xb, yb = rt.upload(x, "test.x"), rt.alloc(4 * 3 * n_rows, "test.y")
    run_launches(rt, mm.matmul(w, xb, yb, 3), step_vars(3))
    assert_close(read(rt, yb, (3, n_rows)), reference(raw, qtype, x), bound(raw, qtype, x), "integer halves")


def default_iq4_lookup(rt) -> int:
    """The MM_IQ4_LOOKUP that quants.h picks for this device's compiler."""
    src = '#include "quants.h"\n__kernel void k(__global int *o) { o[0] = MM_IQ4_LOOKUP; }'
    prg = cl.Program(rt.ctx, src).build(options=[f"-I{rt.kernel_dir}"])
    buf, out = cl.Buffer(rt.ctx, cl.mem_flags.WRITE_ONLY, 4), np.zeros(1, np.int32)
    prg.k(rt.queue, (1,), None, buf)
    cl.enqueue_copy(rt.queue, out, buf)
    return int(out[0])


@pytest.mark.parametrize("lookup", [0, 1, 2], ids=["shuffle", "pshufb", "vpermps"])
@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_iq4_lookup_paths(rt, qtype, lookup):
    """Each way of looking the IQ4 levels up (quants.h iq4_levels) that this device's compiler has: the
    default one runs in every other test, the lower ones are what other CPUs and GPUs get."""
    if lookup > default_iq4_lookup(rt):
        pytest.skip(f"MM_IQ4_LOOKUP={lookup} needs an instruction this device lacks")
    mm = MatmulOps(rt)
    mm.defines = {**mm.defines, "MM_IQ4_LOOKUP": lookup}
    rng = np.random.default_rng(12)
    n_rows, n_cols = SHAPES[qtype][1]
    raw = random_weight(qtype, n_rows, n_cols, rng)
    w = upload_weight(rt, raw, qtype, n_rows, n_cols, "test.w")
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    xb = rt.upload(x, "test.x")
    for max_tokens in (1, 3):
        yb = rt.alloc(4 * max_tokens * n_rows, "test.y")
        run_launches(rt, mm.matmul(w, xb, yb, max_tokens), step_vars(max_tokens))
        assert_close(read(rt, yb, (max_tokens, n_rows)), reference(raw, qtype, x[:max_tokens]),
                     bound(raw, qtype, x[:max_tokens]), f"MM_IQ4_LOOKUP={lookup} max_tokens={max_tokens}")


def test_strided_output_writes_side_by_side(rt):
    """Two weights written into one row with y_stride / y_offset, as the unfused Q|K|V path does."""
    rng = np.random.default_rng(3)
    n_cols, n_tok = 64, 5
    wa, wb = rng.standard_normal((40, n_cols)).astype(np.float32), rng.standard_normal((24, n_cols)).astype(np.float32)
    x = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    f32 = GGMLQuantizationType.F32
    da = upload_weight(rt, wa.view(np.uint8), f32, 40, n_cols, "a")
    db = upload_weight(rt, wb.view(np.uint8), f32, 24, n_cols, "b")
    xb = rt.upload(x, "x")
    y = rt.upload(np.full((n_tok, 64), 7.0, np.float32), "y")
    mm = MatmulOps(rt)
    launches = mm.matmul(da, xb, y, n_tok, y_stride=64, y_offset=0) + mm.matmul(db, xb, y, n_tok, y_stride=64, y_offset=40)
    run_launches(rt, launches, np.array([n_tok, 0, 0, 0], np.int32))
    out = np.empty((n_tok, 64), np.float32)
    cl.enqueue_copy(rt.queue, out, y)
    np.testing.assert_allclose(out, np.concatenate([x @ wa.T, x @ wb.T], axis=1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        mm.matmul(db, xb, y, n_tok, y_stride=64, y_offset=50)


@pytest.mark.parametrize("shape", [(100, 512), (33, 96), (1024, 1024)])
def test_gpu_matvec_kernel(rt, shape):
    """The GPU-shaped Q8_0 mat-vec (used on GPUs for one-token products), forced here on whatever device
    runs the tests: same results as numpy, accumulate / ldy / y_off honoured, zero tokens write nothing."""
    mm = MatmulOps(rt)
    mm.gpu_matvec = True
    rng = np.random.default_rng(6)
    n_rows, n_cols = shape
    raw = random_weight(T.Q8_0, n_rows, n_cols, rng)
    w = upload_weight(rt, raw, T.Q8_0, n_rows, n_cols, "test.w")
    x = rng.standard_normal((1, n_cols)).astype(np.float32)
    ldy, off = n_rows + 9, 5
    y0 = rng.standard_normal((1, ldy)).astype(np.float32)
    xb = rt.upload(x, "test.x")
    for accumulate in (False, True):
        yb = rt.upload(y0, "test.y")
        launches = mm.matmul(w, xb, yb, 1, accumulate=accumulate, y_stride=ldy, y_offset=off)
        assert launches[0].name.startswith("matmul_q8_0") and "gpu" in launches[0].kernel.function_name
        run_launches(rt, launches, step_vars(1))
        y = read(rt, yb, (1, ldy))
        want = reference(raw, T.Q8_0, x) + (y0[:, off : off + n_rows] if accumulate else 0)
        assert_close(y[:, off : off + n_rows], want, bound(raw, T.Q8_0, x) + np.abs(y0[:, off : off + n_rows]),
                     f"gpu mat-vec accumulate={accumulate}")
        assert np.array_equal(y[:, :off], y0[:, :off]) and np.array_equal(y[:, off + n_rows :], y0[:, off + n_rows :])
    yb = rt.upload(y0, "test.y")
    run_launches(rt, mm.matmul(w, xb, yb, 1, y_stride=ldy, y_offset=off), step_vars(0))
    assert np.array_equal(read(rt, yb, (1, ldy)), y0)
