"""qkv_prep (q/k norm + RoPE + KV store in one launch) against the separate kernels it replaces
(norm.cl, rope.cl, kv_store) run one after another.

Tolerance: the fused kernel does the same float32 operations in the same order per element, but its
RMS sum is a sequential loop where norm.cl reduces in a tree: 1e-5 relative on Q; the caches are half,
so K/V agree to one half ulp (compared after float16 rounding with atol 2e-3 relative to the values).
"""

import numpy as np
import pyopencl as cl
import pytest
from conftest import kv_device, kv_host, run_launches
from ops_testonly import rope

from nextn.ops import attention, norm, qkv


def run_case(rt, *, n_head, n_head_kv, hd, n_rot, neox, qk_norm, pos, seq, n_seq=2, n_ctx=64):
    rng = np.random.default_rng(hd + n_rot + int(neox) + int(qk_norm))
    n = len(pos)
    q_dim, kv_dim = n_head * hd, n_head_kv * hd
    x = rng.standard_normal((n, q_dim + 2 * kv_dim)).astype(np.float32)
    qn = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
    kn = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
    vars = np.array([n, n, 0, 0], np.int32)
    bpos, bseq = rt.upload(np.array(pos, np.int32), "pos"), rt.upload(np.array(seq, np.int32), "seq")
    eps, base, scale = 1e-6, 10000.0, 0.5
    cache_shape = (n_seq, n_ctx, n_head_kv, hd)
    init = rng.standard_normal(cache_shape).astype(np.float16)

    # fused
    bx = rt.upload(x, "qkv")
    q_out = rt.alloc(4 * n * q_dim, "q")
    kc, vc = rt.upload(kv_device(init), "kc"), rt.upload(kv_device(init), "vc")
    wq, wk = (rt.upload(qn, "qn"), rt.upload(kn, "kn")) if qk_norm else (None, None)
    run_launches(rt, qkv.qkv_prep(rt, bx, q_out, kc, vc, bpos, bseq, wq, wk, n_head=n_head, n_head_kv=n_head_kv,
                                  head_dim=hd, n_rot=n_rot, neox=neox, freq_base=base, freq_scale=scale, eps=eps,
                                  n_ctx=n_ctx, n_seq=n_seq), vars)

    # separate kernels
    q_sep = rt.upload(np.ascontiguousarray(x[:, :q_dim]), "q2")
    k_sep = rt.upload(np.ascontiguousarray(x[:, q_dim:q_dim + kv_dim]), "k2")
    v_sep = rt.upload(np.ascontiguousarray(x[:, q_dim + kv_dim:]), "v2")
    kc2, vc2 = rt.upload(kv_device(init), "kc2"), rt.upload(kv_device(init), "vc2")
    launches = []
    if qk_norm:
        launches += norm.rms_norm(rt, q_sep, q_sep, wq, hd, n_head, eps, n)
        launches += norm.rms_norm(rt, k_sep, k_sep, wk, hd, n_head_kv, eps, n)
    launches += rope(rt, q_sep, bpos, n_head, hd, n_rot, neox, base, scale, n)
    launches += rope(rt, k_sep, bpos, n_head_kv, hd, n_rot, neox, base, scale, n)
    launches += attention.kv_store(rt, k_sep, v_sep, kc2, vc2, bpos, bseq, n_head_kv, hd, n_ctx, n)
    run_launches(rt, launches, vars)

    def read(buf, shape, dtype):
        out = np.empty(shape, dtype)
        cl.enqueue_copy(rt.queue, out, buf)
        return out

    np.testing.assert_allclose(read(q_out, (n, q_dim), np.float32), read(q_sep, (n, q_dim), np.float32),
                               rtol=1e-5, atol=1e-5)
    device_shape = (n_seq, n_head_kv, n_ctx, hd)
    for a, b in ((kc, kc2), (vc, vc2)):
        got, want = read(a, device_shape, np.float16), read(b, device_shape, np.float16)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    return kv_host(read(kc, device_shape, np.float16)), init


@pytest.mark.parametrize("neox,qk_norm", [(True, True), (False, False), (True, False)])
def test_matches_separate_kernels(rt, neox, qk_norm):
    run_case(rt, n_head=4, n_head_kv=2, hd=64, n_rot=64, neox=neox, qk_norm=qk_norm,
             pos=[0, 1, 2, 40, 41], seq=[0, 0, 0, 1, 1])


def test_partial_rotary_and_small_heads(rt):
    run_case(rt, n_head=8, n_head_kv=2, hd=16, n_rot=8, neox=True, qk_norm=True, pos=[5, 6, 7], seq=[1, 1, 1])


def test_out_of_range_tokens_store_nothing(rt):
    kc, init = run_case(rt, n_head=2, n_head_kv=1, hd=32, n_rot=32, neox=True, qk_norm=True,
                        pos=[3, 64, 2], seq=[0, 0, 5], n_ctx=64)
    changed = np.argwhere((kc != init).any(axis=(2, 3)))
    assert changed.tolist() == [[0, 3]]  # only (seq 0, pos 3); pos 64 and seq 5 are outside the cache
