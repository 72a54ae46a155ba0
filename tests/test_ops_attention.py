"""kernels/attention.cl (kv_store + attention) against numpy.

Every case starts from a cache that already holds random earlier positions of two sequences, stores the
batch's K/V with kv_store, then runs attention; the reference reads the same float16 cache, so:
- kv_store must equal numpy's float16 rounding (round to nearest even) bit for bit;
- attention differs from the float64 reference only by float32 arithmetic: atol 2e-5 on outputs of
  magnitude ~1 (measured ~1.5e-6).
Against K/V kept in float32 instead, the f16 cache itself costs ~1e-3 relative: that comparison uses
atol 5e-3.
"""


import numpy as np
import pyopencl as cl
import pytest

from conftest import kv_device, kv_host, run_launches
from nextn.ops.attention import KvSplit, attention, default_shape, kv_cache_bytes, kv_store

GPU_SHAPE = {"WG": 64, "BQ": 8, "BC": 32, "VW": 4, "RB": 2, "CB": 1, "OB": 1}  # the GPU default at n_rep 2
# small tiles (many tiles), and a work-group size that divides no unit count: 32 O units over 6 work-items
ODD_SHAPE = {"WG": 6, "BQ": 2, "BC": 8, "VW": 8, "RB": 2, "CB": 1, "OB": 1}


def ref_attention(q, k_cache, v_cache, pos, seq, n_head_kv, scale):
    """q [T, n_head, D]; caches [n_seq, n_ctx, n_head_kv, D] -> [T, n_head * D], float64."""
    n_tokens, n_head, d = q.shape
    rep = n_head // n_head_kv
    out = np.zeros((n_tokens, n_head, d))
    for t in range(n_tokens):
        for h in range(n_head):
            k = k_cache[seq[t], : pos[t] + 1, h // rep].astype(np.float64)
            v = v_cache[seq[t], : pos[t] + 1, h // rep].astype(np.float64)
            s = scale * (k @ q[t, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out.reshape(n_tokens, n_head * d)


def run_case(rt, rng, head_dim, n_head, n_head_kv, pos, seq, shape=None, n_seq=2, n_ctx=192):
    pos, seq = np.asarray(pos, np.int32), np.asarray(seq, np.int32)
    n_tokens = len(pos)
    max_tokens = n_tokens + 3  # the plan is built for more tokens than this step has
    kv = n_head_kv * head_dim
    k_cache = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    v_cache = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    k = rng.standard_normal((max_tokens, kv)).astype(np.float32)
    v = rng.standard_normal((max_tokens, kv)).astype(np.float32)
    q = rng.standard_normal((max_tokens, n_head, head_dim)).astype(np.float32)
    pos_buf = np.zeros(max_tokens, np.int32)
    seq_buf = np.zeros(max_tokens, np.int32)
    pos_buf[:n_tokens], seq_buf[:n_tokens] = pos, seq
    b = {name: rt.upload(a, name) for name, a in dict(k=k, v=v, q=q, kc=kv_device(k_cache), vc=kv_device(v_cache),
                                                        pos=pos_buf, seq=seq_buf).items()}
    b["out"] = rt.upload(np.full((max_tokens, n_head * head_dim), 3.0, np.float32), "out")
    scale = 1.0 / np.sqrt(head_dim)
    launches = kv_store(rt, b["k"], b["v"], b["kc"], b["vc"], b["pos"], b["seq"], n_head_kv, head_dim, n_ctx,
                        max_tokens)
    launches += attention(rt, b["q"], b["kc"], b["vc"], b["pos"], b["seq"], b["out"], n_head, n_head_kv,
                          head_dim, n_ctx, scale, max_tokens, shape=shape)
    run_launches(rt, launches, [n_tokens, n_tokens, 0, 0])

    want_k, want_v = k_cache.copy(), v_cache.copy()
    for t in range(n_tokens):
        want_k[seq[t], pos[t]] = k[t].reshape(n_head_kv, head_dim).astype(np.float16)
        want_v[seq[t], pos[t]] = v[t].reshape(n_head_kv, head_dim).astype(np.float16)
    got_k, got_v = kv_device(np.empty_like(k_cache)), kv_device(np.empty_like(v_cache))
    out = np.empty((max_tokens, n_head * head_dim), np.float32)
    for host, name in ((got_k, "kc"), (got_v, "vc"), (out, "out")):
        cl.enqueue_copy(rt.queue, host, b[name])
    got_k, got_v = kv_host(got_k), kv_host(got_v)
    np.testing.assert_array_equal(got_k.view(np.uint16), want_k.view(np.uint16))
    np.testing.assert_array_equal(got_v.view(np.uint16), want_v.view(np.uint16))
    ref = ref_attention(q[:n_tokens], want_k, want_v, pos, seq, n_head_kv, scale)
    np.testing.assert_allclose(out[:n_tokens], ref, rtol=0, atol=2e-5)
    assert (out[n_tokens:] == 3.0).all()  # rows past n_tokens are not written
    return dict(q=q[:n_tokens], k=k[:n_tokens], v=v[:n_tokens], out=out[:n_tokens], k_cache=want_k,
                v_cache=want_v, pos=pos, seq=seq, scale=scale)


# (head_dim, n_head, n_head_kv, positions, seqs, shape)
CASES = {
    # decode: one token of sequence 1, 37 positions already cached
    "decode_d128_gqa2": (128, 16, 8, [37], [1], None),
    # a prompt chunk continuing sequence 0 at position 10
    "chunk_d64_gqa1": (64, 4, 4, list(range(10, 15)), [0] * 5, None),
    # two sequences interleaved token by token (parallel slots), GQA 4
    "mixed_d64_gqa4": (64, 8, 2, [3, 50, 4, 51, 5, 0], [0, 1, 0, 1, 0, 1], None),
    # 64 tokens: a 40-token prompt of seq 1 from 0, then 24 drafts of seq 0 from 100, interleaved blocks
    "batch64_d128_gqa2": (128, 16, 8, list(range(40)) + list(range(100, 124)), [1] * 40 + [0] * 24, None),
    "batch64_gpu_shape": (128, 16, 8, list(range(100, 124)) + list(range(40)), [0] * 24 + [1] * 40,
                          GPU_SHAPE),
    "odd_shape_d64_gqa4": (64, 8, 2, [150, 3, 151, 152, 4], [0, 1, 0, 0, 1], ODD_SHAPE),
    # n_rep 3 (qwen2.5-style odd GQA ratios): 24 rows per group on the CPU shape, 12 on a GPU-like one
    "gqa3_d64": (64, 6, 2, list(range(20, 29)), [1] * 9, None),
    "gqa3_gpu_shape": (64, 6, 2, list(range(20, 29)), [1] * 9, {**GPU_SHAPE, "BQ": 4}),
    # small heads of the tiny test models (head_dim 16 once crashed PoCL's compiler at VW 16)
    "small_d16_gqa2": (16, 4, 2, list(range(7)), [0] * 7, None),
    "small_d32_gqa2": (32, 4, 2, [5, 6], [1, 1], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention(rt, case):
    head_dim, n_head, n_head_kv, pos, seq, shape = CASES[case]
    run_case(rt, np.random.default_rng(len(pos) * head_dim), head_dim, n_head, n_head_kv, pos, seq, shape)


@pytest.mark.parametrize("dec_t", [1, 2, 8])
@pytest.mark.parametrize("case", ["mixed_d64_gqa4", "batch64_d128_gqa2", "odd_shape_d64_gqa4", "small_d16_gqa2"])
def test_attention_decode_path(rt, case, dec_t):
    """The decode path (DEC_T: sequences of at most DEC_T tokens in a block, one work-item each) and the tiled
    path side by side in one batch: blocks of both kinds, out-of-order positions, several sequences."""
    head_dim, n_head, n_head_kv, pos, seq, shape = CASES[case]
    shape = {**(shape or default_shape(rt, head_dim, n_head // n_head_kv)), "DEC_T": dec_t}
    run_case(rt, np.random.default_rng(len(pos) + dec_t), head_dim, n_head, n_head_kv, pos, seq, shape)


def attend_rows(rt, q, k_cache, v_cache, pos, seq, shape, window=0, split=None):
    """Outputs of attention over fixed caches (nothing stored) for the batch (q rows, pos, seq). split: a
    KvSplit, whose count for the batch decides the step's splits (its size must be shape["KV_SPLIT"])."""
    n, n_head, head_dim = q.shape
    n_head_kv = k_cache.shape[2]
    arrays = {"q": q, "kc": kv_device(k_cache), "vc": kv_device(v_cache), "pos": np.asarray(pos, np.int32),
              "seq": np.asarray(seq, np.int32)}
    b = {name: rt.upload(np.ascontiguousarray(a), name) for name, a in arrays.items()}
    b["out"] = rt.upload(np.zeros((n, n_head * head_dim), np.float32), "out")
    launches = attention(rt, b["q"], b["kc"], b["vc"], b["pos"], b["seq"], b["out"], n_head, n_head_kv, head_dim,
                         k_cache.shape[1], head_dim**-0.5, n, shape=shape, window=window, split=split)
    n_split = split.count(n, max(pos)) if split is not None else 1
    run_launches(rt, launches, [n, n, 0, n_split])
    out = np.empty((n, n_head * head_dim), np.float32)
    cl.enqueue_copy(rt.queue, out, b["out"])
    return out


@pytest.mark.parametrize("window", [0, 48])
@pytest.mark.parametrize("n_head,n_head_kv", [(16, 8), (8, 2)])
def test_a_row_is_bit_identical_in_any_batch(rt, n_head, n_head_kv, window):
    """Batch invariance: one token's output is the same bits alone (decode path), as one of 8 slots' decode
    tokens, first and last of a speculative verify step, behind another slot's prompt chunk (tiled path), in a
    long prompt chunk of its own sequence (tiled path), and with the tiled path only (no DEC_T)."""
    rng = np.random.default_rng(n_head + window)
    head_dim, n_ctx, n_seq = 128, 320, 8
    kc = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    vc = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    x_seq, x_pos = 3, 200
    qx = rng.standard_normal((n_head, head_dim)).astype(np.float32)

    def row_of_x(pos, seq, x_at, shape):
        q = rng.standard_normal((len(pos), n_head, head_dim)).astype(np.float32)
        q[x_at] = qx
        return attend_rows(rt, q, kc, vc, pos, seq, shape, window)[x_at]

    cpu = {**default_shape(rt, head_dim, n_head // n_head_kv), "DEC_T": 4}
    alone = row_of_x([x_pos], [x_seq], 0, cpu)
    batches = {
        "8 slots": ([50, 7, 120, x_pos, 9, 300, 1, 64], [0, 1, 2, x_seq, 4, 5, 6, 7], 3),
        "verify, first": ([x_pos, x_pos + 1, x_pos + 2, x_pos + 3], [x_seq] * 4, 0),
        "verify, last": ([x_pos - 3, x_pos - 2, x_pos - 1, x_pos], [x_seq] * 4, 3),
        "after a prompt chunk": (list(range(10, 17)) + [x_pos], [0] * 7 + [x_seq], 7),
        "in a prompt chunk": (list(range(x_pos - 20, x_pos + 20)), [x_seq] * 40, 20),
    }
    for name, (pos, seq, at) in batches.items():
        assert np.array_equal(row_of_x(pos, seq, at, cpu).view(np.uint32), alone.view(np.uint32)), name
    tiled = {k: v for k, v in cpu.items() if k != "DEC_T"}
    assert np.array_equal(row_of_x([x_pos], [x_seq], 0, tiled).view(np.uint32), alone.view(np.uint32))


@pytest.mark.parametrize("window", [0, 80])
@pytest.mark.parametrize("path", ["decode", "tiled", "gpu", "odd"])
def test_split_kv_is_bit_identical(rt, path, window):
    """Flash-decoding: with the KV walked in splits of 64 positions (5 of them at position 300), a row's
    output is the same bits from one group walking every split as from a split launch (one group per split,
    then the combine kernel), alone, among other slots (some with fewer splits than the launch has) and in a
    verify step; and it matches the float64 reference. Paths: the CPU decode path, the tiled path (no
    DEC_T), the GPU shape (tiled, float4), ODD_SHAPE (tiled: small tiles, a work-group size that divides no
    unit count, so a work-item folds several O units)."""
    rng = np.random.default_rng(7 + window)
    n_head, n_head_kv, head_dim, n_ctx, n_seq = 8, 2, 128, 320, 4
    kc = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    vc = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    shape = {**default_shape(rt, head_dim, n_head // n_head_kv), "DEC_T": 4} if path == "decode" else \
        {k: v for k, v in default_shape(rt, head_dim, n_head // n_head_kv).items() if k != "DEC_T"} \
        if path == "tiled" else dict(GPU_SHAPE, BQ=4) if path == "gpu" else dict(ODD_SHAPE)
    shape["KV_SPLIT"] = 64
    qx = rng.standard_normal((n_head, head_dim)).astype(np.float32)
    x_seq, x_pos = 2, 300
    batches = {
        "alone": ([x_pos], [x_seq], 0),
        "4 slots": ([10, 130, x_pos, 70], [0, 1, x_seq, 3], 2),
        "verify": ([x_pos - 2, x_pos - 1, x_pos, x_pos + 1], [x_seq] * 4, 2),
    }
    outs = {}
    for name, (pos, seq, at) in batches.items():
        q = rng.standard_normal((len(pos), n_head, head_dim)).astype(np.float32)
        q[at] = qx
        for mode in ("never", "always"):
            split = KvSplit(rt, n_ctx, 8, n_head, head_dim, mode=mode, size=64)
            out = attend_rows(rt, q, kc, vc, pos, seq, shape, window, split)
            outs[name, mode] = out[at]
            if window == 0:
                ref = ref_attention(q, kc, vc, np.asarray(pos), np.asarray(seq), n_head_kv, head_dim**-0.5)
                np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5, err_msg=f"{name}, {mode}")
    assert split.count(1, x_pos) == 5
    want = outs["alone", "never"].view(np.uint32)
    for key, row in outs.items():
        assert np.array_equal(row.view(np.uint32), want), key


def test_split_count(rt):
    """Splits only for few tokens at a context past one split, and (auto) while the grid is short of groups."""
    split = KvSplit(rt, 8192, 16, 8, 128)
    assert split.size == 512 and split.max_splits == 16
    assert split.count(1, 4000) == 1  # no layer built yet
    split.parts(8, 128, n_head_kv=2)
    assert split.count(1, 511) == 1 and split.count(17, 4000) == 1
    assert split.count(1, 4000) == (8 if 2 < split.compute_units else 1)
    split.mode = "always"
    assert split.count(16, 512) == 2
    split.mode = "never"
    assert split.count(1, 8000) == 1
    assert KvSplit(rt, 131072, 1, 1, 4).size == 4096  # at most MAX_SPLITS (32) splits
    with pytest.raises(ValueError, match="hold 8 heads of 128"):
        split.parts(16, 128, 4)


def test_f16_cache_error_against_float32_kv(rt):
    """With the batch's own K/V kept in float32, the f16 cache costs ~1e-3 relative."""
    n = 33
    r = run_case(rt, np.random.default_rng(9), 64, 4, 2, list(range(n)), [0] * n)
    k32 = r["k_cache"].astype(np.float32)
    v32 = r["v_cache"].astype(np.float32)
    k32[0, :n] = r["k"].reshape(n, 2, 64)
    v32[0, :n] = r["v"].reshape(n, 2, 64)
    ref = ref_attention(r["q"], k32, v32, r["pos"], r["seq"], 2, r["scale"])
    np.testing.assert_allclose(r["out"], ref, rtol=0, atol=5e-3)


def test_kv_store_leaves_out_of_range_tokens(rt):
    """A token whose position is past n_ctx is not stored (no write outside the cache buffer)."""
    n_ctx, kv = 8, 8
    k = np.ones((2, kv), np.float32)
    kc = np.zeros((1, 2, n_ctx, 4), np.float16)  # the device layout [n_seq, n_head_kv, n_ctx, head_dim]
    bk, bkc, bvc = rt.upload(k, "k"), rt.upload(kc, "kc"), rt.upload(kc, "vc")
    bpos, bseq = rt.upload(np.array([3, n_ctx], np.int32), "pos"), rt.upload(np.zeros(2, np.int32), "seq")
    run_launches(rt, kv_store(rt, bk, bk, bkc, bvc, bpos, bseq, 2, 4, n_ctx, 2), [2, 2, 0, 0])
    got = np.empty_like(kc)
    cl.enqueue_copy(rt.queue, got, bkc)
    got = kv_host(got)  # by position
    assert (got[0, 3] == 1).all() and (np.delete(got[0], 3, axis=0) == 0).all()


def test_kv_store_with_no_tokens_stores_nothing(rt):
    kc = np.zeros((1, 4, 1, 4), np.float16)
    bk, bkc, bvc = rt.upload(np.ones((1, 4), np.float32), "k"), rt.upload(kc, "kc"), rt.upload(kc, "vc")
    bpos, bseq = rt.upload(np.array([2], np.int32), "pos"), rt.upload(np.zeros(1, np.int32), "seq")
    run_launches(rt, kv_store(rt, bk, bk, bkc, bvc, bpos, bseq, 1, 4, 4, 1), [0, 0, 0, 0])
    got = np.empty_like(kc)
    cl.enqueue_copy(rt.queue, got, bkc)
    assert (got == 0).all()


def test_kv_cache_bytes():
    assert kv_cache_bytes(2, 4096, 8, 128) == 2 * 2 * 2 * 4096 * 8 * 128


def test_shape_checks(rt):
    buf = rt.alloc(1 << 16, "buf")
    with pytest.raises(ValueError, match="RB"):
        attention(rt, buf, buf, buf, buf, buf, buf, 4, 2, 64, 8, 0.125, 1,
                  shape={"WG": 16, "BQ": 1, "BC": 16, "VW": 16, "RB": 4, "CB": 1})


@pytest.mark.slow
def test_attention_timing(rt):
    """Prints device time for head_dim 128, 16 heads, 8 kv heads: 1 query over 512 cached positions and a
    512-token prompt (causal), with the default tile shape, one launch at a time."""
    d, n_head, n_head_kv, n_ctx = 128, 16, 8, 1024
    rng = np.random.default_rng(0)
    kc = rt.upload(rng.standard_normal((1, n_ctx, n_head_kv, d)).astype(np.float16), "kc")
    vc = rt.upload(rng.standard_normal((1, n_ctx, n_head_kv, d)).astype(np.float16), "vc")
    q = rt.upload(rng.standard_normal((512, n_head, d)).astype(np.float32), "q")
    out = rt.alloc(512 * n_head * d * 4, "out")
    queue = cl.CommandQueue(rt.ctx, rt.device, properties=cl.command_queue_properties.PROFILING_ENABLE)
    cases = (("decode 1 token @ 512 cached", 1, 512, 20), ("prompt 512", 512, 0, 5))
    for label, n_tokens, pos0, reps in cases:
        bpos = rt.upload(np.arange(pos0, pos0 + n_tokens, dtype=np.int32), "pos")
        bseq = rt.upload(np.zeros(n_tokens, np.int32), "seq")
        (launch,) = attention(rt, q, kc, vc, bpos, bseq, out, n_head, n_head_kv, d, n_ctx, d**-0.5, 512)
        v = [n_tokens, n_tokens, 0, 0]
        for i, var in launch.dyn_args:
            launch.kernel.set_arg(i, np.int32(v[var]))
        gsize = launch.global_size(v)
        cl.enqueue_nd_range_kernel(queue, launch.kernel, gsize, launch.local).wait()
        times = []
        for _ in range(reps):
            ev = cl.enqueue_nd_range_kernel(queue, launch.kernel, gsize, launch.local)
            ev.wait()
            times.append((ev.profile.end - ev.profile.start) * 1e-9)
        # min and median: on a shared CPU a small grid often runs on one PoCL thread while the other wakes up
        t, t_med = min(times), float(np.median(times))
        kv_bytes = 2 * 2 * n_head_kv * d * (pos0 + n_tokens)
        flops = 4 * n_head * d * sum(pos0 + i + 1 for i in range(n_tokens))
        print(f"\nattention {label}: min {t * 1e3:.3f} ms (median {t_med * 1e3:.3f}), "
              f"{kv_bytes / t / 1e9:.1f} GB/s of KV, {flops / t / 1e9:.1f} GFLOP/s")


@pytest.mark.parametrize("shape,window", [(None, 40), (GPU_SHAPE, 5), (ODD_SHAPE, 1), (ODD_SHAPE, 40)])
def test_sliding_window_over_a_ring(rt, shape, window):
    """SWA_W / KV_RING (step35's sliding layers): a token at p sees positions p - window < j <= p only, read
    from row j % rows of a ring of rows per sequence; a prompt chunk whose first tokens see tiles the last ones
    do not (rows whose valid columns all lie in later tiles), a decode token of another sequence, and tokens
    nearer position 0 than the window."""
    rng = np.random.default_rng(window)
    head_dim, n_head, n_head_kv, n_ctx = 32, 4, 2, 512
    pos = np.asarray(list(range(30, 46)) + [100, 3, 0], np.int32)
    seq = np.asarray([0] * 16 + [1, 2, 3], np.int32)
    rows = window + 20  # >= window + the most tokens of one sequence - 1
    n_seq, n = 4, len(pos)
    keys = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)  # by position
    vals = rng.standard_normal((n_seq, n_ctx, n_head_kv, head_dim)).astype(np.float16)
    k_ring = np.zeros((n_seq, rows, n_head_kv, head_dim), np.float16)
    v_ring = np.zeros_like(k_ring)
    for s in range(n_seq):
        for p in range(int(pos[seq == s].max()) + 1):  # in order: later positions overwrite earlier ones
            k_ring[s, p % rows], v_ring[s, p % rows] = keys[s, p], vals[s, p]
    q = rng.standard_normal((n, n_head, head_dim)).astype(np.float32)
    b = {name: rt.upload(a, name) for name, a in {"q": q, "kc": kv_device(k_ring), "vc": kv_device(v_ring),
                                                  "pos": pos, "seq": seq}.items()}
    b["out"] = rt.upload(np.zeros((n, n_head * head_dim), np.float32), "out")
    scale = 1.0 / np.sqrt(head_dim)
    launches = attention(rt, b["q"], b["kc"], b["vc"], b["pos"], b["seq"], b["out"], n_head, n_head_kv, head_dim,
                         n_ctx, scale, n, shape=shape, window=window, rows=rows)
    run_launches(rt, launches, [n, n, 0, 0])
    out = np.empty((n, n_head * head_dim), np.float32)
    cl.enqueue_copy(rt.queue, out, b["out"])
    want = np.zeros((n, n_head, head_dim))
    for t in range(n):
        lo = max(0, int(pos[t]) - window + 1)
        k = keys[seq[t], lo : pos[t] + 1].astype(np.float64)
        v = vals[seq[t], lo : pos[t] + 1].astype(np.float64)
        for h in range(n_head):
            sc = scale * (k[:, h // (n_head // n_head_kv)] @ q[t, h].astype(np.float64))
            p = np.exp(sc - sc.max())
            want[t, h] = (p / p.sum()) @ v[:, h // (n_head // n_head_kv)]
    np.testing.assert_allclose(out, want.reshape(n, -1), rtol=0, atol=2e-5)
