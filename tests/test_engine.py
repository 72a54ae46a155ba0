"""The OpenCL engine against the numpy reference, for each architecture x each weight type.

Tolerance: logits are compared relative to their spread (std of the reference logits of that row).
Float weights (F32, F16, BF16) differ from the float64 reference only by float32 accumulation order and
the f16 KV cache: 1e-2 of the spread. Quantized weights (Q8_0, Q4_0, K-quants) additionally quantize the
activations to int8 blocks inside the mat-vec (as llama.cpp does): each product carries ~0.4% relative error,
compounding over layers: 5e-2 of the spread. The tiny models are built with peaky logits (top-1 to top-2
margins far above these bounds), so greedy tokens must match exactly.
"""

import numpy as np
import pytest

from nextn.runner import ModelRunner
from nextn.devtools.tiny import make_tiny
from reference import ReferenceModel

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
ARCHS = ("qwen3", "llama", "qwen2")
N_GREEDY = 64


def tolerance(qtype: str) -> float:
    return 1e-2 if qtype in FLOAT_TYPES else 5e-2


@pytest.fixture(scope="module")
def rt():
    from nextn.cl.runtime import Runtime

    return Runtime()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(arch, qtype, tied=False):
        # untied: greedy walks through many different tokens (a tied tiny head mostly repeats one)
        if (arch, qtype, tied) not in cache:
            # n_embd/n_ff multiples of 256 so every K-quant type is legal for every matrix
            cache[arch, qtype, tied] = make_tiny(d / f"{arch}-{qtype}-{tied}.gguf", arch=arch, qtype=qtype, seed=7,
                                                 n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64,
                                                 n_layer=2, tied=tied)
        return cache[arch, qtype, tied]

    return get


PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11]


@pytest.mark.parametrize("arch,tied", [(a, False) for a in ARCHS] + [("qwen3", True)])
@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES)
def test_logits_and_greedy_match_reference(rt, models, arch, tied, qtype):
    path = models(arch, qtype, tied)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32)

    # whole prompt: logits of every position
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ref.forward(PROMPT, 0)
    spread = want.std(axis=1, keepdims=True)
    err = np.abs(logits - want) / spread
    assert err.max() < tolerance(qtype), f"max error {err.max():.4f} of the logit spread"
    assert (top == want.argmax(axis=1)).all()

    # greedy continuation, token by token on the engine, against the reference's greedy
    expect = ref.greedy(PROMPT, N_GREEDY)
    if not tied:
        assert len(set(expect)) > 10  # the comparison is not trivially a repeated token
    got, token, pos = [], int(top[-1]), len(PROMPT)
    for _ in range(N_GREEDY):
        got.append(token)
        t, _ = runner.eval(0, [token], pos, want_logits=False)
        token, pos = int(t[-1]), pos + 1
    assert got == expect


@pytest.mark.parametrize("n_batch", [1, 4, 7, 64])
def test_prompt_chunking_leaves_same_state(rt, models, n_batch):
    path = models("qwen3", "Q8_0")
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=n_batch)
    prompt = PROMPT * 3
    _, logits = runner.eval(0, prompt, 0)
    full = ModelRunner(path, rt=rt, n_ctx=128, n_batch=64)
    _, want = full.eval(0, prompt, 0)
    np.testing.assert_allclose(logits, want, atol=1e-3 * float(want.std()))


def test_two_sequences_in_one_batch(rt, models):
    """Tokens of two slots in one step read only their own slot's cache."""
    path = models("qwen3", "F32")
    runner = ModelRunner(path, rt=rt, n_ctx=64, n_seq=2, n_batch=32)
    a, b = PROMPT[:6], PROMPT[3:10]
    _, la = runner.eval(0, a, 0)
    _, lb = runner.eval(1, b, 0)
    # now one mixed step: next token of each sequence
    ta, tb = 9, 31
    top, logits = runner.step([ta, tb], [len(a), len(b)], [0, 1], [0, 1], want_logits=True)
    ref = ReferenceModel(path)
    want_a = ref.forward(a + [ta], 0)[-1]
    ref_b = ReferenceModel(path)
    want_b = ref_b.forward(b + [tb], 0)[-1]
    np.testing.assert_allclose(logits[0], want_a, atol=1e-2 * want_a.std())
    np.testing.assert_allclose(logits[1], want_b, atol=1e-2 * want_b.std())


def test_model_that_does_not_fit_is_refused_before_loading(rt, models):
    from nextn.errors import OutOfDeviceMemory

    path = models("qwen3", "F32")
    before = dict(rt.allocated)
    # a KV cache of 1 KiB per position here: twice the device's memory whatever the device
    n_ctx = max(20_000_000, 2 * rt.global_mem_bytes // 1024)
    with pytest.raises(OutOfDeviceMemory) as e:
        ModelRunner(path, rt=rt, n_ctx=n_ctx, n_batch=32)
    msg = str(e.value)
    assert path.name in msg and "needs" in msg and "MiB of device memory but" in msg
    assert rt.allocated == before  # nothing was uploaded


def test_mixed_types_within_a_layer(rt, models, tmp_path):
    """Q4_K_M-style files mix types (attn_v and ffn_up in another type): the unfused path writes Q|K|V and
    gate|up side by side and must agree with the reference too."""
    import gguf

    from gguf_edit import rewrite
    from nextn.gguf.quantize import quantize

    src = models("qwen3", "Q4_K")
    r = gguf.GGUFReader(src)
    repl = {}
    for t in r.tensors:
        if t.name.endswith(("attn_v.weight", "ffn_up.weight")):
            w = gguf.quants.dequantize(np.array(t.data), gguf.GGMLQuantizationType.Q4_K)
            repl[t.name] = (quantize(w.astype(np.float32), "Q6_K"), gguf.GGMLQuantizationType.Q6_K)
    path = rewrite(src, tmp_path / "mixed.gguf", replace=repl)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32)
    assert "blk.0.attn_qkv.weight" not in runner.weights and "blk.0.attn_v.weight" in runner.weights
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ReferenceModel(path).forward(PROMPT, 0)
    err = np.abs(logits - want) / want.std(axis=1, keepdims=True)
    assert err.max() < tolerance("Q4_K")
    assert (top == want.argmax(axis=1)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama3_rope_freqs_match_reference(rt, tmp_path, arch):
    """Llama 3.1/3.2 files carry rope_freqs.weight (a divisor per rotated pair): RoPE divides each pair's angle
    by it, as ggml_rope_ext's freq_factors; the reference applies the same (tests/reference.py::rope)."""
    path = make_tiny(tmp_path / "m.gguf", arch=arch, qtype="Q8_0", seed=4, n_embd=128, head_dim=32, n_ff=256,
                     rope_freqs=True)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32)
    assert "rope_freqs.weight" in runner.weights
    prompt = (PROMPT * 4)[:40]  # long enough for the slow pairs' angles to matter
    top, logits = runner.eval(0, prompt, 0, all_logits=True)
    want = ReferenceModel(path).forward(prompt, 0)
    assert float((np.abs(logits - want) / want.std(axis=-1, keepdims=True)).max()) < tolerance("Q8_0")
    assert (top == want.argmax(axis=1)).all()


def test_load_progress_is_reported(rt, models, caplog):
    """A long load is not silent: the runner reports the fraction of the weights uploaded, and the server's
    build logs it (issue 14 item 13)."""
    import logging

    from nextn import config
    from nextn.build import build

    path = models("qwen3", "Q8_0")
    seen = []
    ModelRunner(path, rt=rt, n_ctx=64, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 5
    cfg = config.load(None, {"model.path": (str(path), "test"), "model.ctx_size": (64, "test")}, system=False)
    with caplog.at_level(logging.INFO, logger="nextn.build"):
        build(cfg, warm_up=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights")]
    assert lines and lines[-1] == "loading weights: 100%"
    assert any(r.getMessage().startswith("device: ") for r in caplog.records)


@pytest.mark.parametrize("arch", ["qwen3", "step35", "qwen35"])
def test_attention_split_over_the_kv_gives_the_same_bits(rt, tmp_path, arch):
    """Flash-decoding end to end: after a 1100-token prompt (3 splits of 512 positions), a decode step and a
    4-token verify step give bit-identical logits with attention split over the KV and without; the split
    decode matches the reference. step35: sliding-window layers over a ring, MoE, its MTP blocks loaded;
    qwen35: the output gate applied as attention writes (and by the combine kernel), recurrent layers."""
    mtp = arch != "qwen3"
    path = make_tiny(tmp_path / "m.gguf", arch=arch, qtype="F32", seed=3, n_ctx=1200, **({"mtp": True} if mtp else {}))
    runner = ModelRunner(path, rt=rt, n_ctx=1200, n_batch=64, mtp=mtp)
    assert runner.kv_split.size == 512 and runner.kv_split.max_splits == 3
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, runner.n_vocab, 1100)]
    top, _ = runner.eval(0, prompt, 0, want_logits=False)
    runner.cache.snapshot(0)  # recurrent layers come back to it (a KV cache needs nothing)
    steps = {"decode": [int(top[-1])], "verify": [int(top[-1]), 5, 9, 77]}
    for name, ids in steps.items():
        pos = list(range(len(prompt), len(prompt) + len(ids)))
        got = {}
        for mode in ("never", "always"):
            runner.kv_split.mode = mode
            assert runner.kv_split.count(len(ids), pos[-1]) == (1 if mode == "never" else 3)
            _, got[mode] = runner.step(ids, pos, [0] * len(ids), list(range(len(ids))), want_logits=True)
            runner.cache.truncate(0, len(prompt))
        assert np.array_equal(got["never"].view(np.uint32), got["always"].view(np.uint32)), name
    if arch != "step35":
        want = ReferenceModel(path).forward(prompt + steps["decode"], 0)[-1]
        _, lg = runner.step(steps["decode"], [len(prompt)], [0], [0], want_logits=True)
        assert np.abs(lg[0] - want).max() / want.std() < tolerance("F32")
