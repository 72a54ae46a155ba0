"""KV cache row types (kernels/kv_types.h; llama-server's --cache-type-k/-v f16, q8_0, q4_0).

qkv_prep writes K and V rows in the cache's type: q8_0 / q4_0 rows are ggml blocks, so gguf.quants
dequantizes them, and they must equal what gguf.quants.quantize (ggml's reference quantizers in numpy) makes of
the same values (rounding ties aside: at most one quant step apart). kernel_attention then reads those rows:
its output must match a float64 attention over the dequantized cache (rtol 1e-4: the float32 online softmax).
The model-level effect (logits within a stated tolerance of f16, greedy tokens identical on the tiny models)
is in tests/test_engine.py.
"""

import gguf
import numpy as np
import pyopencl as cl
import pytest

from conftest import kv_host, run_launches
from nextn.ops import attention, qkv
from nextn.ops.attention import kv_row_bytes
from test_ops_attention import ref_attention

QT = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def dequant_rows(raw: np.ndarray, kv_type: str, shape) -> np.ndarray:
    if kv_type == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(raw.reshape(-1, raw.size // int(np.prod(shape[:-1]))), QT[kv_type]).reshape(shape)


@pytest.mark.parametrize("k_type,v_type", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("f16", "q4_0")])
def test_rows_are_ggml_blocks_and_attention_reads_them(rt, k_type, v_type):
    rng = np.random.default_rng(len(k_type) + 3 * len(v_type))
    n_head, n_head_kv, hd, n_seq, n_ctx = 4, 2, 64, 2, 48
    pos = np.array(list(range(20)) + [0, 1, 2], np.int32)
    seq = np.array([0] * 20 + [1] * 3, np.int32)
    n = len(pos)
    q_dim, kv_dim = n_head * hd, n_head_kv * hd
    x = rng.standard_normal((n, q_dim + 2 * kv_dim)).astype(np.float32)
    vars = np.array([n, n, 0, 0], np.int32)
    bx, q_out = rt.upload(x, "qkv"), rt.alloc(4 * n * q_dim, "q")
    rows = n_seq * n_ctx * n_head_kv
    kc = rt.upload(np.zeros(rows * kv_row_bytes(k_type, hd), np.uint8), "kc")
    vc = rt.upload(np.zeros(rows * kv_row_bytes(v_type, hd), np.uint8), "vc")
    bpos, bseq = rt.upload(pos, "pos"), rt.upload(seq, "seq")
    out = rt.alloc(4 * n * q_dim, "out")
    launches = qkv.qkv_prep(rt, bx, q_out, kc, vc, bpos, bseq, None, None, n_head=n_head, n_head_kv=n_head_kv,
                            head_dim=hd, n_rot=hd, neox=True, freq_base=10000.0, freq_scale=1.0, eps=1e-6,
                            n_ctx=n_ctx, n_seq=n_seq, k_type=k_type, v_type=v_type)
    launches += attention.attention(rt, q_out, kc, vc, bpos, bseq, out, n_head, n_head_kv, hd, n_ctx,
                                    1.0 / np.sqrt(hd), n, k_type=k_type, v_type=v_type)
    run_launches(rt, launches, vars)

    def read(buf, nbytes, dtype=np.uint8):
        a = np.empty(nbytes // np.dtype(dtype).itemsize, dtype)
        cl.enqueue_copy(rt.queue, a, buf)
        return a

    shape = (n_seq, n_head_kv, n_ctx, hd)  # the device's head-major layout
    caches = {}
    for name, buf, t, values in (("k", kc, k_type, None), ("v", vc, v_type, x[:, q_dim + kv_dim :])):
        raw = read(buf, rows * kv_row_bytes(t, hd))
        caches[name] = kv_host(dequant_rows(raw, t, shape))
        if name == "v" and t != "f16":  # V is stored as projected: compare its blocks with ggml's quantizer
            stored = raw.reshape(n_seq, n_head_kv, n_ctx, -1)[seq, :, pos].reshape(-1, kv_row_bytes(t, hd))
            want = gguf.quants.quantize(values.reshape(n * n_head_kv, hd), QT[t]).reshape(stored.shape)
            got_v = gguf.quants.dequantize(stored, QT[t])
            want_v = gguf.quants.dequantize(want, QT[t])
            step = np.abs(want_v).max(axis=1, keepdims=True) / (127 if t == "q8_0" else 7)
            assert (np.abs(got_v - want_v) <= step + 1e-6).all()
    q = read(q_out, 4 * n * q_dim, np.float32).reshape(n, n_head, hd)
    got = read(out, 4 * n * q_dim, np.float32).reshape(n, q_dim)
    want = ref_attention(q, caches["k"], caches["v"], pos, seq, n_head_kv, 1.0 / np.sqrt(hd))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_quantized_types_need_heads_of_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        kv_row_bytes("q8_0", 48)
    with pytest.raises(ValueError, match="supported: f16, q8_0, q4_0"):
        kv_row_bytes("q5_1", 64)


# Measured on the tiny models below (Q8_0 weights, 44-token prompt), the largest logit difference from the f16
# cache relative to the logits' spread: q8_0 0.002-0.005, q4_0 0.03-0.11. The stated tolerances leave room.
TOLERANCE = {"q8_0": 2e-2, "q4_0": 2e-1}
PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nextn.devtools.tiny import make_tiny

    d = tmp_path_factory.mktemp("kv")
    return {arch: make_tiny(d / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=7, n_embd=256, n_ff=512, n_head=4,
                            n_head_kv=2, head_dim=64, mtp=arch in ("qwen35", "glm4moe"))
            for arch in ("qwen3", "llama", "qwen35", "glm4moe")}


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen35", "glm4moe"])
@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_cache_logits_and_greedy_tokens(rt, tiny, arch, kv_type):
    from nextn.memory.kv_cache import KVTypes
    from nextn.runner import ModelRunner

    base = ModelRunner(tiny[arch], rt=rt, n_ctx=128, n_batch=32)
    quant = ModelRunner(tiny[arch], rt=rt, n_ctx=128, n_batch=32, kv_types=KVTypes(kv_type, kv_type))
    assert quant.memory.kv_cache < base.memory.kv_cache * (0.6 if kv_type == "q8_0" else 0.3)
    t0, l0 = base.eval(0, PROMPT, 0, all_logits=True)
    t1, l1 = quant.eval(0, PROMPT, 0, all_logits=True)
    assert float((np.abs(l1 - l0) / l0.std(axis=-1, keepdims=True)).max()) < TOLERANCE[kv_type]
    assert (t0 == t1).all()
    greedy = []
    for runner in (base, quant):  # 24 greedy tokens, each step reading the quantized cache
        toks, pos = [int(t0[-1])], len(PROMPT)
        while len(toks) < 24:
            top, _ = runner.eval(0, toks[-1:], pos, want_logits=False)
            toks.append(int(top[-1]))
            pos += 1
        greedy.append(toks)
    assert greedy[0] == greedy[1]


def test_mtp_block_cache_type_is_its_own(rt, tiny):
    """--spec-draft-type-k/-v: the MTP block's KV in q4_0 (as seed 002's fastest setting) while the model's
    stays f16: speculation still gives the plain greedy output, and the drafts are still mostly right."""
    from nextn.memory.kv_cache import KVTypes
    from nextn.runner import ModelRunner
    from nextn.scheduler import Scheduler
    from nextn.spec.speculator import SpecConfig
    from test_scheduler import collect, run

    path = tiny["glm4moe"]
    plain = ModelRunner(path, rt=rt, n_ctx=128, n_seq=1, n_batch=32)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_seq=1, n_batch=32, mtp=True, speculative=True,
                         kv_types=KVTypes(mtp_k="q4_0", mtp_v="q4_0"))
    assert runner.cache.kv_types(runner.hp.n_layer) == ("q4_0", "q4_0") and runner.cache.kv_types(0) == ("f16", "f16")
    out = {}
    for name, r, spec in (("plain", plain, None), ("mtp", runner, SpecConfig(types=("draft-mtp",), adaptive=False))):
        sched = Scheduler(r, 1, spec=spec)
        sched.start()
        try:
            out[name] = collect(run(sched, PROMPT[:11], 32, ignore_eos=True)[1])
        finally:
            sched.drain(0)
    assert out["mtp"][0] == out["plain"][0]
    t = out["mtp"][2].timings
    assert t["draft_n_accepted"] > t["draft_n"] // 2


def test_cache_types_from_the_command_line(tiny, tmp_path):
    import subprocess
    import sys

    def nextn(*args):
        return subprocess.run([sys.executable, "-m", "nextn", *map(str, args)], capture_output=True, text=True)

    r = nextn("generate", "-m", tiny["qwen3"], "-p", "hello", "-n", 8, "--ignore-eos", "-ctk", "q8_0", "-ctv",
              "q4_0")
    assert r.returncode == 0, r.stderr
    info = nextn("inspect", tiny["qwen3"], "-ctk", "q8_0", "-ctv", "q4_0")
    assert "KV cache K q8_0 V q4_0" in info.stdout
    bad = nextn("generate", "-m", tiny["qwen3"], "-p", "x", "-ctk", "q5_1")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    small = tmp_path / "h16.gguf"
    from nextn.devtools.tiny import make_tiny

    make_tiny(small, arch="qwen3", seed=1)  # heads of 16 values: not whole q8_0 blocks
    refused = nextn("generate", "-m", small, "-p", "x", "-ctk", "q8_0")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr and "--cache-type-k q8_0" in refused.stderr
