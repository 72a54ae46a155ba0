"""MoE FFN ops (kernels/moe.cl, MM_KERNEL_ID in kernels/quants.h) against tests/reference.py::moe_ffn
in float64.

Weights are quantized with nextn.gguf.quantize and the reference uses the dequantized weights, so the only
differences are float32 rounding (the routing itself must match exactly: expert ids and order). Tolerance:
2e-5 of the largest |output| (plus 2e-5 relative); the kernels, which accumulate in float32 over rows of a
few hundred products through three chained products, measured at most 1e-6 here, while a wrong expert, a
lost token or a wrong weight changes outputs by their own size.
"""

import numpy as np
import pyopencl as cl
import pytest
from conftest import run_launches
from gguf import GGMLQuantizationType
from ops_testonly import upload_gate_up_experts
from reference import moe_ffn as ref_moe_ffn

from nextn.cl.launch import N_VARS, VAR_N_TOKENS
from nextn.gguf.quantize import dequantize, quantize
from nextn.ops.matmul import MatmulOps
from nextn.ops.moe import (
    MoeBuffers,
    experts_bytes,
    moe_ffn,
    shared_expert_add,
    upload_experts,
)
from nextn.ops.weights import TILE_ROWS, device_bytes, repack, upload_weight

T = GGMLQuantizationType


@pytest.fixture(scope="module")
def mm(rt):
    return MatmulOps(rt)


def step_vars(n_tokens: int) -> list[int]:
    v = [0] * N_VARS
    v[VAR_N_TOKENS] = n_tokens
    return v


def read(rt, buf, shape, dtype=np.float32) -> np.ndarray:
    out = np.empty(shape, dtype)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


def quantized(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., n_cols] -> (GGUF bytes uint8 [rows, row_bytes], dequantized float64 in w's shape)."""
    rows = w.reshape(-1, w.shape[-1])
    raw = quantize(rows, qtype)
    return raw, dequantize(raw, qtype, w.shape[-1]).astype(np.float64).reshape(w.shape)


class Layer:
    """A random MoE layer on the device and its dequantized float64 copy."""

    def __init__(self, rt, qtype, n_expert, n_embd, n_ff, rng, fused=False, gate_inp=None):
        self.n_expert, self.n_embd, self.n_ff = n_expert, n_embd, n_ff
        if gate_inp is None:
            gate_inp = rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)
        gate_inp = np.ascontiguousarray(gate_inp, np.float32)
        self.gate_inp = gate_inp.astype(np.float64)
        self.d_gate_inp = upload_weight(rt, gate_inp.view(np.uint8), T.F32, n_expert, n_embd, "test.gate_inp")
        s = 1.0 / np.sqrt(n_embd)
        gate = (rng.standard_normal((n_expert, n_ff, n_embd)) * s).astype(np.float32)
        up = (rng.standard_normal((n_expert, n_ff, n_embd)) * s).astype(np.float32)
        down = (rng.standard_normal((n_expert, n_embd, n_ff)) / np.sqrt(n_ff)).astype(np.float32)
        raw_g, self.gate = quantized(gate, qtype)
        raw_u, self.up = quantized(up, qtype)
        raw_d, self.down = quantized(down, qtype)
        if fused:  # one gate|up weight: per expert the gate rows, then the up rows
            self.d_gate = upload_gate_up_experts(
                rt, raw_g, raw_u, qtype, n_expert, n_ff, n_embd, "test.gate_up_exps"
            )
            self.d_up = None
        else:
            self.d_gate = upload_experts(rt, raw_g, qtype, n_expert, n_ff, n_embd, "test.gate_exps")
            self.d_up = upload_experts(rt, raw_u, qtype, n_expert, n_ff, n_embd, "test.up_exps")
        self.d_down = upload_experts(rt, raw_d, qtype, n_expert, n_embd, n_ff, "test.down_exps")

    def launches(self, rt, mm, cur_b, x_b, n_used, w_scale, max_tokens):
        # kept on the layer: a kernel argument does not keep its buffer alive
        self.buf = buf = MoeBuffers.allocate(rt, self.n_embd, self.n_ff, self.n_expert, n_used, max_tokens)
        return moe_ffn(
            rt,
            mm,
            cur_b,
            x_b,
            self.d_gate_inp,
            self.d_gate,
            self.d_up,
            self.d_down,
            self.n_expert,
            n_used,
            w_scale,
            buf,
            max_tokens,
        )

    def reference(self, cur, n_used, w_scale):
        return ref_moe_ffn(
            cur.astype(np.float64), self.gate_inp, self.gate, self.up, self.down, n_used, w_scale
        )


def run_and_check(rt, mm, layer, cur, n_used, w_scale, max_tokens, n_tokens, rng, what):
    """Run moe_ffn for n_tokens of a max_tokens plan on a random residual x: x[:n] += ref, the rest kept."""
    x0 = rng.standard_normal((max_tokens, layer.n_embd)).astype(np.float32)
    cur_b, x_b = rt.upload(cur[:max_tokens], "test.cur"), rt.upload(x0, "test.x")
    launches = layer.launches(rt, mm, cur_b, x_b, n_used, w_scale, max_tokens)
    run_launches(rt, launches, step_vars(n_tokens))
    x = read(rt, x_b, x0.shape)
    ref = layer.reference(cur[:n_tokens], n_used, w_scale)
    got = x[:n_tokens].astype(np.float64) - x0[:n_tokens]
    tol = 2e-5 * np.abs(ref).max() + 2e-5 * np.abs(ref) + 1e-6 * np.abs(x0[:n_tokens])
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"{what}: |err| {err[worst]:.3g} > {tol[worst]:.3g} at {worst}"
    assert np.array_equal(x[n_tokens:], x0[n_tokens:]), f"{what}: rows past n_tokens must be left alone"
    layer.io = (cur_b, x_b)  # alive as long as the launches that use them
    return launches, x0, x_b, x


# (weight type, n_expert, n_used, n_embd, n_ff_exp, w_scale): F32 with n_embd and n_ff not multiples of 16
# (every expert's last tile is partial) and n_embd % 4 == 2 (the combine's scalar tail); the block types need
# multiples of their block (32, 256) in both dimensions.
CASES = [
    (T.F32, 8, 2, 42, 24, 0.0),
    (T.Q8_0, 16, 4, 64, 96, 2.5),
    (T.Q4_K, 8, 4, 256, 256, 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-e{c[1]}-k{c[2]}")
def test_moe_ffn_against_reference(rt, mm, case):
    """Decode (1 token, mat-vec chunking), a few-token plan (5 of 16) and a prompt plan (37 of 40)."""
    qtype, n_expert, n_used, n_embd, n_ff, w_scale = case
    rng = np.random.default_rng(n_expert * 100 + n_used + qtype.value)
    layer = Layer(rt, qtype, n_expert, n_embd, n_ff, rng)
    cur = rng.standard_normal((40, n_embd)).astype(np.float32)
    for max_tokens, n_tokens in ((1, 1), (16, 5), (40, 37)):
        run_and_check(
            rt,
            mm,
            layer,
            cur,
            n_used,
            w_scale,
            max_tokens,
            n_tokens,
            rng,
            f"{qtype.name} max_tokens={max_tokens} n={n_tokens}",
        )


def test_moe_ffn_fused_gate_up_and_several_steps(rt, mm):
    """ffn_gate_up_exps (up_exps None); one plan run for 37, then 3, then 0 tokens (stale routing state
    from the larger step must not leak into the smaller one); the same step twice gives identical bits."""
    rng = np.random.default_rng(5)
    layer = Layer(rt, T.Q8_0, 16, 64, 64, rng, fused=True)
    cur = rng.standard_normal((40, 64)).astype(np.float32)
    launches, x0, x_b, first = run_and_check(rt, mm, layer, cur, 4, 0.0, 40, 37, rng, "fused n=37")
    cl.enqueue_copy(rt.queue, x_b, x0)
    run_launches(rt, launches, step_vars(37))
    assert np.array_equal(read(rt, x_b, x0.shape), first), "the same step must give the same bits"
    cl.enqueue_copy(rt.queue, x_b, x0)
    run_launches(rt, launches, step_vars(3))
    x = read(rt, x_b, x0.shape)
    ref = layer.reference(cur[:3], 4, 0.0)
    np.testing.assert_allclose(x[:3] - x0[:3], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.array_equal(x[3:], x0[3:])
    run_launches(rt, launches, step_vars(0))
    assert np.array_equal(read(rt, x_b, x0.shape), x), "0 tokens must change nothing"


def test_moe_ffn_crowded_experts_and_ties(rt, mm):
    """Every token picks the same two experts, 70 rows each (two 64-row chunks of one expert in the prompt
    plan), and they tie with a third: experts 1, 4 and 6 have identical router rows, so their logits are equal
    and the lower indices (1, 4) must win."""
    rng = np.random.default_rng(9)
    n_expert, n_embd = 8, 32
    v = np.abs(rng.standard_normal(n_embd)).astype(np.float32)
    gate_inp = (rng.standard_normal((n_expert, n_embd)) * 0.01).astype(np.float32)
    gate_inp[[1, 4, 6]] = v
    layer = Layer(rt, T.F32, n_expert, n_embd, 48, rng, gate_inp=gate_inp)
    cur = (np.abs(rng.standard_normal((80, n_embd))) + 0.5).astype(np.float32)  # positive along v
    logits = cur.astype(np.float64) @ layer.gate_inp.T
    assert np.all(np.argsort(-logits, axis=1, kind="stable")[:, :2] == [1, 4])
    for max_tokens, n_tokens in ((80, 70), (16, 16), (1, 1)):
        run_and_check(rt, mm, layer, cur, 2, 0.0, max_tokens, n_tokens, rng, f"crowded n={n_tokens}")


def test_matmul_id(rt, mm):
    """Expert-indexed rows: uneven and empty expert ranges, experts of 40 rows (a partial last tile each),
    output side by side in a wider row (y_stride / y_offset), the three chunkings, rows past bounds kept."""
    rng = np.random.default_rng(2)
    n_expert, rows, n_cols = 5, 40, 64
    w = (rng.standard_normal((n_expert, rows, n_cols)) * 0.1).astype(np.float32)
    raw, wq = quantized(w, T.Q8_0)
    dw = upload_experts(rt, raw, T.Q8_0, n_expert, rows, n_cols, "test.experts")
    assert dw.n_rows == rows and dw.n_expert == n_expert and dw.rows_per_expert == rows
    ldy, y_off = 50, 7
    for max_tokens, counts in ((1, [1, 0, 1, 1, 0]), (16, [3, 0, 16, 1, 9]), (80, [70, 5, 0, 0, 66])):
        counts = np.array(counts)
        n_rows_x = int(counts.sum())
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        max_rows = n_rows_x + 3
        x = rng.standard_normal((max_rows, n_cols)).astype(np.float32)
        y0 = np.full((max_rows, ldy), 5.0, np.float32)
        xb, yb, bb = rt.upload(x, "test.x"), rt.upload(y0, "test.y"), rt.upload(bounds, "test.bounds")
        launches = mm.matmul_id(dw, xb, yb, bb, max_tokens, max_rows, y_stride=ldy, y_offset=y_off)
        run_launches(rt, launches, step_vars(int(counts.max())))
        y = read(rt, yb, y0.shape)
        expert = np.repeat(np.arange(n_expert), counts)
        ref = np.einsum("sc,src->sr", x[:n_rows_x].astype(np.float64), wq[expert])
        scale = np.einsum("sc,src->sr", np.abs(x[:n_rows_x]).astype(np.float64), np.abs(wq[expert]))
        assert np.all(np.abs(y[:n_rows_x, y_off : y_off + rows] - ref) <= 1e-5 * scale), (
            f"max_tokens={max_tokens}"
        )
        keep = np.ones(y0.shape, bool)
        keep[:n_rows_x, y_off : y_off + rows] = False
        assert np.all(y[keep] == 5.0), (
            f"max_tokens={max_tokens}: only the experts' rows and columns are written"
        )
    with pytest.raises(ValueError, match="upload_experts"):
        mm.matmul_id(upload_weight(rt, raw[:rows], T.Q8_0, rows, n_cols, "plain"), xb, yb, bb, 1, 1)
    with pytest.raises(ValueError, match="fit"):
        mm.matmul_id(dw, xb, yb, bb, 1, 1, y_stride=ldy, y_offset=20)


def test_upload_experts_pads_each_expert_to_whole_tiles(rt):
    rng = np.random.default_rng(4)
    n_expert, rows, n_cols = 3, 21, 64
    raw = rng.integers(0, 256, (n_expert * rows, 68), dtype=np.uint8)  # Q8_0 rows: 2 blocks of 34 bytes
    assert experts_bytes(T.Q8_0, n_expert, rows, n_cols) == n_expert * device_bytes(T.Q8_0, rows, n_cols)
    assert device_bytes(T.Q8_0, rows, n_cols) == 2 * TILE_ROWS * 68
    dw = upload_experts(rt, raw, T.Q8_0, n_expert, rows, n_cols, "test.experts")
    assert dw.nbytes == experts_bytes(T.Q8_0, n_expert, rows, n_cols)
    tiles = read(rt, dw.buffers["tiles"], (dw.nbytes,), np.uint8)
    per = dw.nbytes // n_expert
    for e in range(n_expert):
        want = repack(raw[e * rows : (e + 1) * rows], T.Q8_0, rows, n_cols)
        assert np.array_equal(tiles[e * per : (e + 1) * per], want), f"expert {e}"
    with pytest.raises(ValueError, match="uint8 bytes"):
        upload_experts(rt, raw[:-1], T.Q8_0, n_expert, rows, n_cols, "test.bad")
    # gate|up fused on upload = a file's ffn_gate_up_exps (per expert the gate rows, then the up rows)
    up = rng.integers(0, 256, raw.shape, dtype=np.uint8)
    fused = upload_gate_up_experts(rt, raw, up, T.Q8_0, n_expert, rows, n_cols, "test.gate_up")
    both = np.concatenate([raw.reshape(n_expert, rows, -1), up.reshape(n_expert, rows, -1)], axis=1)
    file_like = upload_experts(rt, both, T.Q8_0, n_expert, 2 * rows, n_cols, "test.gate_up_file")
    assert (fused.n_expert, fused.n_rows, fused.nbytes) == (n_expert, 2 * rows, file_like.nbytes)
    assert np.array_equal(
        read(rt, fused.buffers["tiles"], (fused.nbytes,), np.uint8),
        read(rt, file_like.buffers["tiles"], (fused.nbytes,), np.uint8),
    )


def test_moe_buffers_and_checks(rt, mm):
    args = (42, 24, 8, 2, 16)
    buf = MoeBuffers.allocate(rt, *args)
    sizes = [
        getattr(buf, k).size
        for k in ("logits", "ids", "wts", "bounds", "pair_token", "pair_slot", "xg", "gu", "act")
    ]
    assert sum(sizes) == MoeBuffers.bytes_needed(*args)
    with pytest.raises(ValueError):
        MoeBuffers.bytes_needed(42, 24, 8, 9, 16)  # n_used > n_expert
    rng = np.random.default_rng(0)
    layer = Layer(rt, T.F32, 8, 42, 24, rng)
    small = rt.alloc(4 * 42 * 16, "test.small")
    with pytest.raises(ValueError, match="buffers"):  # buffers made for fewer tokens than the plan
        moe_ffn(
            rt, mm, small, small, layer.d_gate_inp, layer.d_gate, layer.d_up, layer.d_down, 8, 2, 0.0, buf, 32
        )
    with pytest.raises(ValueError, match="ffn_down_exps"):  # experts swapped
        moe_ffn(
            rt, mm, small, small, layer.d_gate_inp, layer.d_gate, layer.d_up, layer.d_gate, 8, 2, 0.0, buf, 16
        )


def test_shared_expert_add(rt):
    rng = np.random.default_rng(6)
    n_embd, max_tokens, n = 42, 8, 5
    y_sh = rng.standard_normal((max_tokens, n_embd)).astype(np.float32)
    g = (rng.standard_normal(max_tokens) * 3).astype(np.float32)
    g[0] = -100.0  # exp overflows: the gate is 0, not NaN
    x0 = rng.standard_normal((max_tokens, n_embd)).astype(np.float32)
    x_b, y_b, g_b = rt.upload(x0, "test.x"), rt.upload(y_sh, "test.y_sh"), rt.upload(g, "test.g")
    launches = shared_expert_add(rt, y_b, g_b, x_b, n_embd, max_tokens)
    run_launches(rt, launches, step_vars(n))
    x = read(rt, x_b, x0.shape)
    sig = 1.0 / (1.0 + np.exp(-g[:n].astype(np.float64)))
    np.testing.assert_allclose(x[:n], x0[:n] + sig[:, None] * y_sh[:n], rtol=1e-6, atol=1e-6)
    assert np.array_equal(x[n:], x0[n:])
