"""kernels/ssm_conv.cl and kernels/delta_net.cl against tests/delta_net_reference.py (float64).

Tolerances: every kernel works in float32. The conv and the norms are a handful of FMAs per output:
rtol 1e-5, atol 1e-6. The delta rule carries its state through every token: each step adds rounding of
about dk * 2^-24 relative to |S| (a dk-term dot product), and the state is a contraction (|k| = 1,
0 < beta < 1, decay <= 1), so errors add up rather than grow; over 100 tokens at dk 128 that is
~1e-5 relative. We use rtol 1e-4, atol 2e-5 on outputs and states (values are O(1)). The recurrent
and chunked forms sum in different orders, so they agree within the same bound, not bit for bit;
a given form and split is deterministic, so snapshot / restore is compared for exact equality, and so is
a sequence in a mixed batch against the same tokens launched alone (the chunked form cuts its chunks where
the sequence changes, so a contiguous run is chunked as it would be alone).

Mixed batches (continuous batching): seqs holds the slot of each token; a slot id outside [0, n_seq) must
write nothing. The state lives in a sub-buffer with a sentinel margin of at least one sequence on each
side (`Guarded`), so a write through slot -1 or n_seq would land where the test sees it.
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


def seqs_buf(rt, seqs):
    """The per-token slot array (int32 [n_tokens]) as the batch's seq buffer."""
    return rt.upload(np.asarray(seqs, np.int32), "seqs")


SENTINEL = 7.0


class Guarded:
    """A state array in a sub-buffer of a larger buffer whose margins (one sequence or more on each side,
    the front rounded up to the device's sub-buffer alignment) hold SENTINEL; the kernels size n_seq from
    the sub-buffer. `read` returns the state and asserts that the margins are untouched."""

    def __init__(self, rt, state):
        self.rt, self.shape = rt, state.shape
        per_seq = state[0].nbytes
        align = rt.device.mem_base_addr_align // 8
        self.front = -(-per_seq // align) * align // 4  # floats
        host = np.full(self.front + state.size + 2 * state[0].size, SENTINEL, np.float32)
        host[self.front:self.front + state.size] = state.ravel()
        self.parent = rt.upload(host, "guarded state")
        self.buf = self.parent.get_sub_region(4 * self.front, state.nbytes)

    def read(self):
        host = np.empty(self.parent.size // 4, np.float32)
        cl.enqueue_copy(self.rt.queue, host, self.parent)
        n = int(np.prod(self.shape))
        assert (host[:self.front] == SENTINEL).all(), "a write landed before the state buffer"
        assert (host[self.front + n:] == SENTINEL).all(), "a write landed after the state buffer"
        return host[self.front:self.front + n].reshape(self.shape)


# Batches mixing sequences, as lists of (slot, run length). n_seq is 4: slot 1 is never in a batch (its state
# must stay as it was); 4 and -1 are outside [0, n_seq) and must be skipped.
N_SEQ = 4
LAYOUTS = {
    "runs": [(2, 1), (0, 5), (3, 9)],  # one contiguous run per sequence, short ones
    "decode": [(3, 1), (0, 1), (2, 1)],  # one token per sequence, as a decode step of three slots
    "long_run": [(3, 2), (0, 70), (2, 3)],  # a run longer than a 64-token chunk between two short ones
    "two_runs": [(0, 3), (2, 4), (0, 6)],  # sequence 0 comes back after sequence 2
    "bad_ids": [(0, 2), (N_SEQ, 3), (-1, 1), (0, 3), (2, 2)],  # slots outside [0, n_seq) in the middle
}


def layout_seqs(layout):
    return np.concatenate([np.full(n, s, np.int32) for s, n in layout])


def contiguous(layout) -> bool:
    """Each valid sequence appears in one run: its chunks are then those of the same tokens alone."""
    valid = [s for s, _ in layout if 0 <= s < N_SEQ]
    return len(valid) == len(set(valid)) and len(valid) == len(layout)


# -- ssm_conv ---------------------------------------------------------------------------------------

# channels per work-item on a CPU (the largest of 16, 8, 4, 2, 1 dividing channels): 8, 1, 2, 4, 8
@pytest.mark.parametrize("channels, n_tokens", [(40, 1), (41, 7), (42, 3), (36, 5), (200, 64)])
def test_ssm_conv(rt, channels, n_tokens):
    rng = np.random.default_rng(channels + n_tokens)
    ks, n_seq, seq = 4, 3, 1
    x = rng.standard_normal((n_tokens + 2, channels)).astype(np.float32)
    w = rng.standard_normal((channels, ks)).astype(np.float32)
    st = rng.standard_normal((n_seq, ks - 1, channels)).astype(np.float32)
    bx, bw, bst = rt.upload(x, "x"), rt.upload(w, "w"), rt.upload(st, "st")
    by = rt.upload(np.full_like(x, 7.0), "y")
    bseq = seqs_buf(rt, [seq] * (n_tokens + 2))
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
    bw, bseq = rt.upload(w, "w"), seqs_buf(rt, [0] * 7)
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ssm_conv_mixed_batch(rt, layout):
    """One launch over a batch of several sequences = each sequence's tokens through the reference from its
    own state; states of sequences not in the batch and rows of skipped tokens untouched, nothing written
    outside the state buffer."""
    layout = LAYOUTS[layout]
    seqs = layout_seqs(layout)
    n, channels, ks = len(seqs), 72, 4
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, channels)).astype(np.float32)
    w = rng.standard_normal((channels, ks)).astype(np.float32)
    st = rng.standard_normal((N_SEQ, ks - 1, channels)).astype(np.float32)
    bx, bw, bseq = rt.upload(x, "x"), rt.upload(w, "w"), seqs_buf(rt, seqs)
    by = rt.upload(np.full_like(x, SENTINEL), "y")
    gst = Guarded(rt, st)
    run_launches(rt, dn.ssm_conv(rt, bx, by, bw, gst.buf, bseq, channels, ks, n), [n, 0, 0, 0])
    y, st_new = read(rt, by, x.shape), gst.read()
    for s in range(N_SEQ):
        rows = seqs == s
        if not rows.any():
            np.testing.assert_array_equal(st_new[s], st[s], err_msg=f"sequence {s} is not in the batch")
            continue
        y_ref, st_ref = ref.ssm_conv(x[rows], w, st[s])
        np.testing.assert_allclose(y[rows], y_ref, rtol=1e-5, atol=1e-6, err_msg=f"sequence {s}")
        np.testing.assert_array_equal(st_new[s], st_ref.astype(np.float32), err_msg=f"sequence {s}")
    skipped = (seqs < 0) | (seqs >= N_SEQ)
    assert (y[skipped] == SENTINEL).all()


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
    """Device buffers for up to max_tokens tokens and the launches of one form; the state in a Guarded
    sub-buffer. A run's tokens belong to sequence `seq` unless a per-token seqs array is given."""

    def __init__(self, rt, hk, hv, dk, dv, state, max_tokens, form, seq=1):
        self.rt, self.shape, self.seq = rt, (hk, hv, dk, dv), seq
        qkv_dim = 2 * hk * dk + hv * dv
        self.qkv = rt.alloc(4 * max_tokens * qkv_dim, "qkv")
        self.g = rt.alloc(4 * max_tokens * hv, "g")
        self.beta = rt.alloc(4 * max_tokens * hv, "beta")
        self.out = rt.alloc(4 * max_tokens * hv * dv, "out")
        self.state = Guarded(rt, state)
        self.seqs = rt.alloc(4 * max_tokens, "seqs")
        self.launches = dn.delta_net(rt, self.qkv, self.g, self.beta, self.state.buf, self.out, self.seqs,
                                     hk, hv, dk, dv, max_tokens, form=form)

    def run(self, qkv, g, beta, seqs=None):
        n = qkv.shape[0]
        write(self.rt, self.qkv, qkv)
        write(self.rt, self.g, g)
        write(self.rt, self.beta, beta)
        # rows of skipped tokens must keep the sentinel
        write(self.rt, self.out, np.full((n, self.shape[1] * self.shape[3]), SENTINEL))
        seqs = np.full(n, self.seq) if seqs is None else seqs
        cl.enqueue_copy(self.rt.queue, self.seqs, np.ascontiguousarray(seqs, np.int32))
        run_launches(self.rt, self.launches, [n, 0, 0, 0])
        return read(self.rt, self.out, (n, self.shape[1] * self.shape[3]))

    def read_state(self):
        return self.state.read()


SHAPES = [(2, 2, 16, 16), (2, 4, 32, 32), (1, 2, 128, 128)]  # (n_k_heads, n_v_heads, dk, dv)


@pytest.mark.parametrize("form", ["recurrent", "recurrent_v16", "chunked"])
@pytest.mark.parametrize("hk, hv, dk, dv", SHAPES)
@pytest.mark.parametrize("n", [1, 7, 64, 100])
def test_delta_net(rt, form, hk, hv, dk, dv, n):
    rng = np.random.default_rng(n * 1000 + dk + hv)
    qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv)
    rig = DeltaRig(rt, hk, hv, dk, dv, state, n, form)
    out = rig.run(qkv, g, beta)
    o_ref, s_ref = ref_from_prepped(qkv, g, beta, state[1], hk, hv, dk, dv)
    np.testing.assert_allclose(out, o_ref, rtol=RTOL, atol=ATOL)
    st = rig.read_state()
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
        np.testing.assert_allclose(rig.read_state()[1], s_ref, rtol=RTOL, atol=ATOL,
                                   err_msg=f"step {step}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_net_mixed_batch(rt, layout):
    """One launch over a batch of several sequences, both forms: each sequence's outputs and state equal the
    reference run over its tokens alone, and (for one run per sequence) the same kernel launched on those
    tokens alone, bit for bit; the forms agree; sequence 1 (not in the batch) and the rows of skipped
    tokens are untouched; nothing is written outside the state buffer."""
    layout = LAYOUTS[layout]
    hk, hv, dk, dv = 2, 4, 32, 32
    seqs = layout_seqs(layout)
    n = len(seqs)
    rng = np.random.default_rng(n + len(layout))
    qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv, n_seq=N_SEQ)
    skipped = (seqs < 0) | (seqs >= N_SEQ)
    outs = {}
    for form in ("recurrent", "recurrent_v16", "chunked"):
        rig = DeltaRig(rt, hk, hv, dk, dv, state, n, form)
        out = rig.run(qkv, g, beta, seqs)
        st = rig.read_state()
        assert (out[skipped] == SENTINEL).all(), form
        np.testing.assert_array_equal(st[1], state[1], err_msg=f"{form}: sequence 1 is not in the batch")
        for s in sorted(set(seqs[~skipped].tolist())):
            rows = seqs == s
            o_ref, s_ref = ref_from_prepped(qkv[rows], g[rows], beta[rows], state[s], hk, hv, dk, dv)
            np.testing.assert_allclose(out[rows], o_ref, rtol=RTOL, atol=ATOL, err_msg=f"{form}, sequence {s}")
            np.testing.assert_allclose(st[s], s_ref, rtol=RTOL, atol=ATOL, err_msg=f"{form}, sequence {s}")
            if contiguous(layout):
                alone = DeltaRig(rt, hk, hv, dk, dv, state, n, form, seq=s)
                np.testing.assert_array_equal(out[rows], alone.run(qkv[rows], g[rows], beta[rows]),
                                              err_msg=f"{form}, sequence {s} alone")
                np.testing.assert_array_equal(st[s], alone.read_state()[s], err_msg=f"{form}, sequence {s} alone")
        outs[form] = out, st
    for other in ("recurrent_v16", "chunked"):
        np.testing.assert_allclose(outs["recurrent"][0], outs[other][0], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(outs["recurrent"][1], outs[other][1], rtol=RTOL, atol=ATOL)


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
    bconv, bdelta, bseq = rt.upload(conv0, "conv"), rt.upload(delta0, "delta"), seqs_buf(rt, [seq] * n)
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
        bseq = seqs_buf(rt, [0] * n)  # kernels do not own their buffers: keep it referenced while it runs
        conv = dn.ssm_conv(rt, bx, bx, bw, bst, bseq, ch, ks, n)
        run_launches(rt, conv, [n, 0, 0, 0])
        t0 = time.perf_counter()
        run_launches(rt, conv, [n, 0, 0, 0])
        results[("conv", n)] = time.perf_counter() - t0
    for key, sec in sorted(results.items()):
        print(f"{key[0]:>9} n_tokens={key[1]:4d}: {sec * 1e3:8.2f} ms" + (" (incl. host upload of qkv, g, beta)" if key[0] != "conv" else ""))
