"""kernels/ssm_conv.cl and kernels/delta_net.cl against tests/delta_net_reference.py (float64).

Tolerances: every kernel works in float32. The conv and the norms are a handful of FMAs per output:
rtol 1e-5, atol 1e-6. The delta rule carries its state through every token: each step adds rounding of
about dk * 2^-24 relative to |S| (a dk-term dot product), and the state is a contraction (|k| = 1,
0 < beta < 1, decay <= 1), so errors add up rather than grow; over 100 tokens at dk 128 that is
~1e-5 relative. We use rtol 1e-4, atol 2e-5 on outputs and states (values are O(1)). The recurrent
and chunked forms sum in different orders, so they agree within the same bound, not bit for bit;
a given form and split is deterministic, so snapshot / restore is compared for exact equality.
"""

import time

import numpy as np
import pyopencl as cl
import pytest

import delta_net_reference as ref
from conftest import run_launches
from nextn.ops import delta_net as dn

EPS = 1e-6
RTOL, ATOL = 1e-4, 2e-5


def read(rt, buf, shape):
    out = np.empty(shape, np.float32)
    cl.enqueue_copy(rt.queue, out, buf)
    return out


def write(rt, buf, arr):
    cl.enqueue_copy(rt.queue, buf, np.ascontiguousarray(arr, np.float32))


def seqs_buf(rt, seq):
    return rt.upload(np.array([seq], np.int32), "seqs")


# -- ssm_conv ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, n_tokens", [(40, 1), (40, 7), (200, 64)])
def test_ssm_conv(rt, channels, n_tokens):
    rng = np.random.default_rng(channels + n_tokens)
    ks, n_seq, seq = 4, 3, 1
    x = rng.standard_normal((n_tokens + 2, channels)).astype(np.float32)
    w = rng.standard_normal((channels, ks)).astype(np.float32)
    st = rng.standard_normal((n_seq, ks - 1, channels)).astype(np.float32)
    bx, bw, bst = rt.upload(x, "x"), rt.upload(w, "w"), rt.upload(st, "st")
    by = rt.upload(np.full_like(x, 7.0), "y")
    bseq = seqs_buf(rt, seq)
    run_launches(rt, dn.ssm_conv(rt, bx, by, bw, bst, bseq, channels, ks, n_tokens + 2), [n_tokens, 0, 0, 0])
    y_ref, st_ref = ref.ssm_conv(x[:n_tokens], w, st[seq])
    y, st_new = read(rt, by, x.shape), read(rt, bst, st.shape)
    np.testing.assert_allclose(y[:n_tokens], y_ref, rtol=1e-5, atol=1e-6)
    assert (y[n_tokens:] == 7.0).all()
    np.testing.assert_array_equal(st_new[seq], st_ref.astype(np.float32))  # copies, no arithmetic
    np.testing.assert_array_equal(np.delete(st_new, seq, 0), np.delete(st, seq, 0))


def test_ssm_conv_in_place_and_split(rt):
    """y aliasing x, and 7 tokens as 3 + 4 leave the same outputs and state as 7 at once."""
    rng = np.random.default_rng(5)
    channels, ks = 96, 4
    x = rng.standard_normal((7, channels)).astype(np.float32)
    w = rng.standard_normal((channels, ks)).astype(np.float32)
    bw, bseq = rt.upload(w, "w"), seqs_buf(rt, 0)
    bst = rt.upload(np.zeros((1, ks - 1, channels), np.float32), "st")
    bx = rt.alloc(x.nbytes, "x")
    launches = dn.ssm_conv(rt, bx, bx, bw, bst, bseq, channels, ks, 7)
    ys = []
    for a, b in ((0, 3), (3, 7)):
        write(rt, bx, x[a:b])
        run_launches(rt, launches, [b - a, 0, 0, 0])
        ys.append(read(rt, bx, x.shape)[:b - a])
    y_ref, st_ref = ref.ssm_conv(x, w, np.zeros((ks - 1, channels)))
    np.testing.assert_allclose(np.concatenate(ys), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read(rt, bst, (ks - 1, channels)), st_ref.astype(np.float32))


# -- gates, l2 norm, gated norm ---------------------------------------------------------------------

def test_gdn_prep(rt):
    rng = np.random.default_rng(2)
    hk, hv, dk, dv, n = 2, 4, 32, 32, 5
    qkv_dim = 2 * hk * dk + hv * dv
    qkv = (rng.standard_normal((n, qkv_dim)) * 2).astype(np.float32)
    alpha = (rng.standard_normal((n, hv)) * 4).astype(np.float32)  # softplus on both sides of 0, large |a|
    b = rng.standard_normal((n, hv)).astype(np.float32)
    dt_bias = rng.standard_normal(hv).astype(np.float32)
    ssm_a = -np.exp(rng.standard_normal(hv)).astype(np.float32)
    bufs = [rt.upload(a, name) for a, name in ((qkv, "qkv"), (alpha, "alpha"), (b, "b"), (dt_bias, "dt"), (ssm_a, "a"))]
    run_launches(rt, dn.gdn_prep(rt, *bufs, hk, hv, dk, dv, EPS, n), [n, 0, 0, 0])
    out = read(rt, bufs[0], qkv.shape)
    q_ref = ref.l2_norm(qkv[:, :hk * dk].reshape(n, hk, dk).astype(np.float64), EPS) / np.sqrt(dk)
    k_ref = ref.l2_norm(qkv[:, hk * dk:2 * hk * dk].reshape(n, hk, dk).astype(np.float64), EPS)
    np.testing.assert_allclose(out[:, :hk * dk], q_ref.reshape(n, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, hk * dk:2 * hk * dk], k_ref.reshape(n, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[:, 2 * hk * dk:], qkv[:, 2 * hk * dk:])  # v untouched
    g_ref, beta_ref = ref.gates(alpha, b, dt_bias, ssm_a)
    np.testing.assert_allclose(read(rt, bufs[1], alpha.shape), g_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read(rt, bufs[2], b.shape), beta_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dv, hv, n", [(16, 4, 3), (128, 8, 5)])
def test_gated_rms_norm(rt, dv, hv, n):
    rng = np.random.default_rng(dv)
    x = (rng.standard_normal((n, hv * dv)) * 3).astype(np.float32)
    z = rng.standard_normal((n, hv * dv)).astype(np.float32)
    w = rng.standard_normal(dv).astype(np.float32)
    bx, bz, bw = rt.upload(x, "x"), rt.upload(z, "z"), rt.upload(w, "w")
    run_launches(rt, dn.gated_rms_norm(rt, bx, bz, bw, bx, hv, dv, EPS, n), [n, 0, 0, 0])  # in place
    expect = ref.gated_rms_norm(x.reshape(-1, dv), z.reshape(-1, dv), w, EPS).reshape(n, -1)
    np.testing.assert_allclose(read(rt, bx, x.shape), expect, rtol=1e-5, atol=1e-6)


# -- the delta rule ---------------------------------------------------------------------------------

def make_inputs(rng, n, hk, hv, dk, dv, n_seq=2):
    """A prepped qkv (l2-normalised q / sqrt(dk), k), gates as the model produces them, a random state."""
    q = ref.l2_norm(rng.standard_normal((n, hk, dk)), EPS) / np.sqrt(dk)
    k = ref.l2_norm(rng.standard_normal((n, hk, dk)), EPS)
    v = rng.standard_normal((n, hv * dv))
    qkv = np.concatenate([q.reshape(n, -1), k.reshape(n, -1), v], axis=1).astype(np.float32)
    g, beta = ref.gates(rng.standard_normal((n, hv)) * 2, rng.standard_normal((n, hv)),
                        np.full(hv, 0.5), -np.exp(rng.standard_normal(hv)))
    state = (rng.standard_normal((n_seq, hv, dk, dv)) * 0.3).astype(np.float32)
    return qkv, g.astype(np.float32), beta.astype(np.float32), state


def ref_from_prepped(qkv, g, beta, state, hk, hv, dk, dv):
    """The reference takes raw q, k; a prepped row is already unit-norm (q scaled), so undo the q scale."""
    raw = qkv.astype(np.float64).copy()
    raw[:, :hk * dk] *= np.sqrt(dk)
    return ref.delta_net(raw, g.astype(np.float64), beta.astype(np.float64), state, hk, hv, dk, dv, 0.0)


class DeltaRig:
    """Device buffers for up to max_tokens tokens and the launches of one form."""

    def __init__(self, rt, hk, hv, dk, dv, state, max_tokens, form, seq=1):
        self.rt, self.shape = rt, (hk, hv, dk, dv)
        qkv_dim = 2 * hk * dk + hv * dv
        self.qkv = rt.alloc(4 * max_tokens * qkv_dim, "qkv")
        self.g = rt.alloc(4 * max_tokens * hv, "g")
        self.beta = rt.alloc(4 * max_tokens * hv, "beta")
        self.out = rt.alloc(4 * max_tokens * hv * dv, "out")
        self.state = rt.upload(state, "state")
        self.seqs = seqs_buf(rt, seq)
        self.launches = dn.delta_net(rt, self.qkv, self.g, self.beta, self.state, self.out, self.seqs,
                                     hk, hv, dk, dv, max_tokens, form=form)

    def run(self, qkv, g, beta):
        n = qkv.shape[0]
        write(self.rt, self.qkv, qkv)
        write(self.rt, self.g, g)
        write(self.rt, self.beta, beta)
        run_launches(self.rt, self.launches, [n, 0, 0, 0])
        hk, hv, dk, dv = self.shape
        return read(self.rt, self.out, (n, hv * dv))

    def read_state(self, shape):
        return read(self.rt, self.state, shape)


SHAPES = [(2, 2, 16, 16), (2, 4, 32, 32), (1, 2, 128, 128)]  # (n_k_heads, n_v_heads, dk, dv)


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
@pytest.mark.parametrize("hk, hv, dk, dv", SHAPES)
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_delta_net(rt, form, hk, hv, dk, dv, n):
    rng = np.random.default_rng(n * 1000 + dk + hv)
    qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv)
    rig = DeltaRig(rt, hk, hv, dk, dv, state, n, form)
    out = rig.run(qkv, g, beta)
    o_ref, s_ref = ref_from_prepped(qkv, g, beta, state[1], hk, hv, dk, dv)
    np.testing.assert_allclose(out, o_ref, rtol=RTOL, atol=ATOL)
    st = rig.read_state(state.shape)
    np.testing.assert_allclose(st[1], s_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(st[0], state[0])  # the other sequence is untouched


@pytest.mark.parametrize("hk, hv, dk, dv", SHAPES[1:])
def test_prompt_splits_agree(rt, hk, hv, dk, dv):
    """100 tokens as chunks of 1, 7, 64 and all at once: same outputs, same state. Steps of 1 token run the
    recurrent kernel, longer ones the chunked kernel (what "auto" does on a GPU)."""
    rng = np.random.default_rng(dk)
    n = 100
    qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv)
    o_ref, s_ref = ref_from_prepped(qkv, g, beta, state[1], hk, hv, dk, dv)
    for step in (1, 7, 64, n):
        rig = DeltaRig(rt, hk, hv, dk, dv, state, step, "recurrent" if step == 1 else "chunked")
        outs = [rig.run(qkv[a:a + step], g[a:a + step], beta[a:a + step]) for a in range(0, n, step)]
        np.testing.assert_allclose(np.concatenate(outs), o_ref, rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        np.testing.assert_allclose(rig.read_state(state.shape)[1], s_ref, rtol=RTOL, atol=ATOL,
                                   err_msg=f"step {step}")


def test_delta_net_rejects_bad_heads(rt):
    buf = rt.alloc(4096, "b")
    with pytest.raises(ValueError, match="multiple"):
        dn.delta_net(rt, buf, buf, buf, buf, buf, buf, 3, 4, 16, 16, 1)


# -- the whole layer block, snapshot and restore ---------------------------------------------------

def test_snapshot_run_restore_rerun(rt):
    """conv + prep + delta + gated norm on sequence 1 of 2: snapshot, run 5 tokens, restore, rerun:
    identical outputs and states (bit for bit), and the reference agrees."""
    rng = np.random.default_rng(9)
    hk, hv, dk, dv, ks, n_seq, seq, n = 2, 4, 32, 32, 4, 2, 1, 5
    ch = 2 * hk * dk + hv * dv
    x = rng.standard_normal((n, ch)).astype(np.float32)
    z = rng.standard_normal((n, hv * dv)).astype(np.float32)
    alpha = rng.standard_normal((n, hv)).astype(np.float32)
    b = rng.standard_normal((n, hv)).astype(np.float32)
    w = (rng.standard_normal((ch, ks)) * 0.5).astype(np.float32)
    dt_bias, ssm_a = rng.standard_normal(hv).astype(np.float32), -np.exp(rng.standard_normal(hv)).astype(np.float32)
    norm_w = rng.standard_normal(dv).astype(np.float32)
    conv0 = rng.standard_normal((n_seq, ks - 1, ch)).astype(np.float32)
    delta0 = (rng.standard_normal((n_seq, hv, dk, dv)) * 0.3).astype(np.float32)

    bx, bz, ba, bb = (rt.alloc(a.nbytes, name) for a, name in ((x, "x"), (z, "z"), (alpha, "alpha"), (b, "b")))
    bw, bdt, bsa, bnw = (rt.upload(a, name) for a, name in ((w, "w"), (dt_bias, "dt"), (ssm_a, "a"), (norm_w, "nw")))
    bconv, bdelta, bseq = rt.upload(conv0, "conv"), rt.upload(delta0, "delta"), seqs_buf(rt, seq)
    bo = rt.alloc(4 * n * hv * dv, "o")
    launches = (dn.ssm_conv(rt, bx, bx, bw, bconv, bseq, ch, ks, n)
                + dn.gdn_prep(rt, bx, ba, bb, bdt, bsa, hk, hv, dk, dv, EPS, n)
                + dn.delta_net(rt, bx, ba, bb, bdelta, bo, bseq, hk, hv, dk, dv, n)
                + dn.gated_rms_norm(rt, bo, bz, bnw, bo, hv, dv, EPS, n))
    layout = [(bconv, dn.conv_state_bytes(1, ch, ks)), (bdelta, dn.delta_state_bytes(1, hv, dk, dv))]
    snap = rt.alloc(dn.snapshot_bytes(layout), "snap")
    assert dn.snapshot_bytes(layout) == dn.state_bytes(1, ch, ks, hv, dk, dv)

    def run():
        for buf, a in ((bx, x), (bz, z), (ba, alpha), (bb, b)):
            write(rt, buf, a)
        run_launches(rt, launches, [n, 0, 0, 0])
        return read(rt, bo, (n, hv * dv)), read(rt, bconv, conv0.shape), read(rt, bdelta, delta0.shape)

    dn.snapshot(rt, layout, seq, snap)
    first = run()
    dn.restore(rt, layout, seq, snap)
    np.testing.assert_array_equal(read(rt, bconv, conv0.shape), conv0)
    np.testing.assert_array_equal(read(rt, bdelta, delta0.shape), delta0)
    second = run()
    for a, b_ in zip(first, second):
        np.testing.assert_array_equal(a, b_)

    conv_y, conv_ref = ref.ssm_conv(x, w, conv0[seq])
    g_ref, beta_ref = ref.gates(alpha, b, dt_bias, ssm_a)
    o_ref, s_ref = ref.delta_net(conv_y, g_ref, beta_ref, delta0[seq], hk, hv, dk, dv, EPS)
    y_ref = ref.gated_rms_norm(o_ref.reshape(-1, dv), z.reshape(-1, dv), norm_w, EPS).reshape(n, -1)
    np.testing.assert_allclose(first[0], y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(first[1][seq], conv_ref, rtol=0, atol=0)
    np.testing.assert_allclose(first[2][seq], s_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(first[2][0], delta0[0])


def test_snapshot_refuses_a_bad_sequence(rt):
    buf = rt.alloc(4 * 64, "state")
    snap = rt.alloc(4 * 32, "snap")
    with pytest.raises(ValueError, match="sequence 2"):
        dn.snapshot(rt, [(buf, 4 * 32)], 2, snap)


# -- timings at Qwen3.5 sizes -----------------------------------------------------------------------

@pytest.mark.slow
def test_timings_qwen35_sizes(rt):
    """Decode (1 token) and prompt (512 tokens) of one layer at 16 k heads, 32 v heads, dk = dv = 128
    (Qwen3.5 / Qwen3.6 linear-attention sizes). Prints the figures; asserts only that they ran."""
    hk, hv, dk, dv, ks = 16, 32, 128, 128, 4
    rng = np.random.default_rng(0)
    ch = 2 * hk * dk + hv * dv
    results = {}
    for n in (1, 512):
        qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv, n_seq=2)
        for form in ("recurrent", "chunked"):
            rig = DeltaRig(rt, hk, hv, dk, dv, state, n, form)
            rig.run(qkv, g, beta)  # warm-up (compile, first-touch)
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                rig.run(qkv, g, beta)
            results[(form, n)] = (time.perf_counter() - t0) / reps
        bx = rt.upload(rng.standard_normal((n, ch)).astype(np.float32), "x")
        bw = rt.upload(rng.standard_normal((ch, ks)).astype(np.float32), "w")
        bst = rt.alloc(dn.conv_state_bytes(1, ch, ks), "st")
        bseq = seqs_buf(rt, 0)  # kernels do not own their buffers: keep it referenced while it runs
        conv = dn.ssm_conv(rt, bx, bx, bw, bst, bseq, ch, ks, n)
        run_launches(rt, conv, [n, 0, 0, 0])
        t0 = time.perf_counter()
        run_launches(rt, conv, [n, 0, 0, 0])
        results[("conv", n)] = time.perf_counter() - t0
    for key, sec in sorted(results.items()):
        print(f"{key[0]:>9} n_tokens={key[1]:4d}: {sec * 1e3:8.2f} ms" + (" (incl. host upload of qkv, g, beta)" if key[0] != "conv" else ""))
