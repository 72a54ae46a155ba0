"""step35 (Step-3.5: per-layer head counts, interleaved sliding-window and full attention with their own RoPE
dims and bases, the head-wise attention gate, SwiGLU limits, a dense layer then sigmoid-routed experts with a
selection bias and a shared expert, and chained MTP blocks) on the OpenCL engine against the numpy reference
(tests/reference.py::Step35ReferenceModel).

The tiny models have a window of 8 and n_batch 32, so sliding layers keep a ring of 39 rows per sequence:
64 greedy tokens after the prompt wrap it. Tolerances as tests/test_engine.py.
"""

import numpy as np
import pytest
from reference import ReferenceModel
from test_engine_qwen35 import PROMPT, engine_greedy, spread_error, tolerance

from nextn.cl.runtime import Runtime
from nextn.devtools.tiny import make_tiny
from nextn.errors import ModelLoadError
from nextn.runner import ModelRunner

TYPES = ("F32", "Q8_0", "Q4_K")
N_GREEDY = 64
N_NEXTN = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("step35")
    cache = {}

    def get(qtype, mtp=True, **kw):
        key = (qtype, mtp, tuple(sorted(kw.items())))
        if key not in cache:
            # every row length a multiple of 256, so the K-quants are legal for every matrix
            args = {"n_embd": 256, "n_ff": 512, "n_head": 4, "n_head_kv": 2, "head_dim": 64, "n_expert": 8,
                    "n_expert_used": 2, "n_ff_exp": 256, "n_ff_shexp": 256, "qk_norm": True, "n_swa": 8,
                    "n_nextn": N_NEXTN}
            args.update(kw)
            cache[key] = make_tiny(d / f"step35-{qtype}-{mtp}-{len(cache)}.gguf", arch="step35", qtype=qtype,
                                   seed=3, mtp=mtp, **args)
        return cache[key]

    return get


@pytest.mark.parametrize("qtype", TYPES)
def test_logits_and_greedy_match_reference(rt, models, qtype):
    path = models(qtype)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    assert runner.cache.layer_rows(1) == 8 + 32 - 1 and runner.cache.layer_rows(0) == 160  # ring, full
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ref.forward(PROMPT, 0)
    assert spread_error(logits, want) < tolerance(qtype)
    assert (top == want.argmax(axis=1)).all()
    expect = ref.greedy(PROMPT, N_GREEDY)
    assert len(set(expect)) > 10  # not trivially one repeated token
    assert engine_greedy(runner, 0, PROMPT, N_GREEDY) == expect


@pytest.mark.parametrize("variant", [{"qk_norm": False}, {"rope_freqs": True}, {"swiglu_limit": 0.0, "tied": True},
                                     {"n_swa": 3, "n_dense_lead": 0}])
def test_variants_match_reference(rt, models, variant):
    """No q/k norms, Llama-3 rope factors (full layers only), no SwiGLU limits with a tied head, a window of
    3 and no dense layer: each optional part is read from the file and computed as llama.cpp does."""
    path = models("Q8_0", **variant)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    ref = ReferenceModel(path)
    prompt = PROMPT * 3
    top, logits = runner.eval(0, prompt, 0, all_logits=True)
    want = ref.forward(prompt, 0)
    assert spread_error(logits, want) < tolerance("Q8_0")
    assert (top == want.argmax(axis=1)).all()


def test_sliding_window_is_what_attention_sees(rt, models, tmp_path):
    """The same file with a window as long as the context gives other logits past the window, the same
    before it: the window is applied, and only where it should be."""
    import gguf
    from gguf_edit import rewrite

    path = models("F32", mtp=False)
    wide = rewrite(path, tmp_path / "wide.gguf", drop_keys=("step35.attention.sliding_window",),
                   set_keys={"step35.attention.sliding_window": (160, gguf.GGUFValueType.UINT32)})
    prompt = PROMPT * 2
    _, a = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32).eval(0, prompt, 0, all_logits=True)
    _, b = ModelRunner(wide, rt=rt, n_ctx=160, n_batch=32).eval(0, prompt, 0, all_logits=True)
    np.testing.assert_allclose(a[:8], b[:8], atol=1e-4 * float(a.std()))
    assert spread_error(a[8:], b[8:]) > 0.05


def test_prompt_chunks_and_mixed_sequences(rt, models):
    """Chunks of 1 (a ring of exactly the window), 7 and the whole prompt leave the same state; prompt chunks
    of two slots and a decode token of a third in one step each see only their own KV."""
    path = models("Q8_0")
    results = {}
    for n_batch in (1, 7, 64):
        _, results[n_batch] = ModelRunner(path, rt=rt, n_ctx=160, n_batch=n_batch).eval(0, PROMPT * 3, 0)
    for n_batch, got in results.items():
        np.testing.assert_allclose(got, results[64], atol=1e-3 * float(results[64].std()), err_msg=str(n_batch))
    runner = ModelRunner(path, rt=rt, n_ctx=64, n_seq=3, n_batch=32)
    a, b, c = PROMPT[:6], (PROMPT * 2)[:20], PROMPT[5:9]
    runner.eval(2, c, 0, want_logits=False)
    ids = a + b + [31]
    pos = list(range(len(a))) + list(range(len(b))) + [len(c)]
    rows = [len(a) - 1, len(a) + len(b) - 1, len(ids) - 1]
    _, logits = runner.step(ids, np.asarray(pos, np.int32), [0] * len(a) + [1] * len(b) + [2], rows, True)
    for got, tokens in zip(logits, (a, b, c + [31])):
        assert spread_error(got, ReferenceModel(path).forward(tokens, 0)[-1]) < tolerance("Q8_0")


def test_ring_memory_rollback_and_prefix_reuse(rt, models):
    """A sliding layer holds window + n_batch - 1 rows per sequence. Rolling back a verify step keeps the
    right state; a prefix whose window was overwritten is not reused (the sequence starts over), one still
    in the ring is, and either way the logits that follow are the reference's."""
    path = models("Q8_0")
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    plain = ModelRunner(path, rt=rt, n_ctx=160, n_batch=160)
    kv = runner.cache
    assert kv.layer_rows(1) == 39 and sum(b.size for b in kv.layer(1)) * 160 == sum(
        b.size for b in plain.cache.layer(1)) * 39
    prompt = (PROMPT * 5)[:60]
    runner.eval(0, prompt, 0, want_logits=False)
    # a verify step of 5 rows keeping 2, then the next token
    ids = [9, 8, 7, 6, 5]
    runner.step(ids, np.arange(60, 65, dtype=np.int32), [0] * 5, [0], False)
    runner.rollback(0, list(range(5)), 2)
    _, got = runner.eval(0, [4], 62)
    ref = ReferenceModel(path)
    want = ref.forward(prompt + ids[:2] + [4], 0)[-1]
    assert spread_error(got[-1], want) < tolerance("Q8_0")
    with pytest.raises(ValueError, match="sliding-window layer no longer holds"):
        runner.eval(0, [4], 20)  # positions 13..19 were overwritten (the ring holds 24..62): not silently
    runner.eval(0, prompt + ids[:2] + [4], 0, want_logits=False)
    assert runner.reuse(0, 20) == 0  # the same as a prompt-cache decision: start over
    assert runner.reuse(0, 0) == 0
    runner.eval(0, prompt, 0, want_logits=False)
    assert runner.reuse(0, 50) == 50  # 43..49 still held
    _, got = runner.eval(0, [4, 5], 50)
    assert spread_error(got[-1], ref.forward(prompt[:50] + [4, 5], 0)[-1]) < tolerance("Q8_0")


@pytest.mark.parametrize("own_head", [False, True])
def test_mtp_chain_matches_reference(rt, models, own_head):
    """Every MTP block over the prompt (each token with the trunk's previous hidden state, zeros at 0), then
    the chain: block 1 over d1 with block 0's output, block 2 over d1, d2 with blocks 0's and 1's outputs."""
    path = models("Q8_0", mtp_own_head=own_head)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=True)
    assert runner.mtp_heads == N_NEXTN
    n = len(PROMPT)
    runner.eval(0, PROMPT, 0, want_logits=False)
    ref.forward(PROMPT, 0)
    hidden = np.vstack([np.zeros((1, ref.n_embd)), ref.h_nextn[:-1]])
    pos = np.arange(n, dtype=np.int32)
    for head in range(N_NEXTN):
        want = ref.mtp_forward(hidden, PROMPT, 0, head)
        if head == 0:
            h0 = ref.mtp_h_nextn[-1]
        top, got = runner.mtp_step(PROMPT, pos, [0] * n, [-1] + list(range(n - 1)), list(range(n)),
                                   want_logits=True, head=head)
        assert spread_error(got, want) < tolerance("Q8_0"), head
        assert (top == want.argmax(axis=1)).all()
    # head 0's rows are in its region of the pool; the last one gave d1
    d1 = int(ref.mtp_forward(hidden, PROMPT, 0, 0).argmax(axis=1)[-1])
    want1 = ref.mtp_forward(h0, [d1], n, 1)
    h1 = ref.mtp_h_nextn[-1]
    top1, got1 = runner.mtp_step([d1], np.array([n], np.int32), [0], [runner.mtp_hidden_row(0, n - 1)], [0],
                                 source="mtp", want_logits=True, head=1)
    assert spread_error(got1, want1) < tolerance("Q8_0")
    d2 = int(want1.argmax())
    assert int(top1[0]) == d2
    want2 = ref.mtp_forward(np.vstack([h0, h1]), [d1, d2], n, 2)
    top2, got2 = runner.mtp_step([d1, d2], np.array([n, n + 1], np.int32), [0, 0],
                                 [runner.mtp_hidden_row(0, n - 1), runner.mtp_hidden_row(1, 0)], [1],
                                 source="mtp", want_logits=True, head=2)
    assert spread_error(got2, want2[-1:]) < tolerance("Q8_0")
    assert int(top2[0]) == int(want2[-1].argmax())


def test_mtp_memory_only_when_asked(models):
    path = models("Q8_0")
    used = {}
    for mtp in (False, True):
        rt = Runtime()
        runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=mtp)
        used[mtp] = sum(rt.allocated.values())
        plan = runner.memory
    assert used[True] - used[False] == plan.mtp_weights + plan.mtp_kv_cache + plan.mtp_activations > 0
    assert used[True] <= plan.total


def test_trunk_only_file_runs_and_refuses_mtp_clearly(rt, models, tmp_path):
    """A file whose metadata declares the MTP blocks (nextn_predict_layers = 3) without their tensors: the trunk
    runs, draft-mtp is refused with a message saying what is missing, and `nextn inspect` says so."""
    import gguf
    from gguf_edit import rewrite

    from nextn.model_info import describe

    src = models("Q8_0")
    mtp_names = [t.name for t in gguf.GGUFReader(src).tensors
                 if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= 4]
    path = rewrite(src, tmp_path / "trunk.gguf", drop=mtp_names)
    _, got = ModelRunner(path, rt=rt, n_ctx=64).eval(0, PROMPT, 0)
    _, want = ModelRunner(src, rt=rt, n_ctx=64).eval(0, PROMPT, 0)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ModelLoadError, match="nextn_predict_layers declares an MTP block but the file has no"):
        ModelRunner(path, rt=rt, n_ctx=64, mtp=True)
    assert "tensors are not in the file" in describe(path)


@pytest.mark.parametrize("key,value,vtype,match", [
    ("step35.expert_gating_func", 1, "UINT32", "expert_gating_func"),
    ("step35.expert_used_count", 99, "UINT32", "expert_used_count"),
    ("step35.rope.dimension_count", 7, "UINT32", "rope.dimension_count"),
    ("step35.nextn_predict_layers", 9, "UINT32", "nextn_predict_layers"),
    ("step35.attention.sliding_window", 0, "UINT32", "attention.sliding_window"),
    ("step35.attention.sliding_window_pattern", [True, False], "ARRAY", "sliding_window_pattern"),
    ("step35.attention.head_count", [4, 8], "ARRAY", "attention.head_count"),
    ("step35.attention.head_count_kv", 3, "UINT32", "head_count_kv"),
    ("step35.swiglu_clamp_exp", [1.0, 2.0], "ARRAY", "swiglu_clamp_exp"),
    ("step35.rope.scaling.type", "yarn", "STRING", "rope.scaling.type"),
])
def test_bad_metadata_is_refused_naming_the_key(rt, models, tmp_path, key, value, vtype, match):
    import gguf
    from gguf_edit import rewrite

    path = rewrite(models("F32"), tmp_path / "bad.gguf", drop_keys=(key,),
                   set_keys={key: (value, getattr(gguf.GGUFValueType, vtype))})
    with pytest.raises(ModelLoadError, match=match):
        ModelRunner(path, rt=rt, n_ctx=64)


# -- speculation and the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec_runner(models):
    return ModelRunner(models("Q8_0"), n_ctx=256, n_seq=2, n_batch=32, mtp=True, speculative=True)


@pytest.mark.slow
def test_greedy_output_identical_with_every_drafter(spec_runner, tmp_path_factory):
    """Plain greedy output equals the output with each draft type (the three chained MTP blocks, n-gram
    drafters, a draft model, chains of them) at n-max 1, 2, 3; some drafts are accepted, some rolled back."""
    from test_speculative import NGRAM, generate

    from nextn.spec.speculator import SpecConfig

    runner = spec_runner
    draft = ModelRunner(make_tiny(tmp_path_factory.mktemp("d") / "d.gguf", arch="qwen3", qtype="Q8_0", seed=9),
                        n_ctx=256, n_seq=2, n_batch=32)
    tok = runner.tokenizer
    p0 = tok.encode("one two three four", True, False)
    first, _ = generate(runner, None, p0, 12)
    prompt = p0 + first + p0
    plain, _ = generate(runner, None, prompt, 48)
    drafted = accepted = 0
    types = [("draft-mtp",), ("ngram-mod", "draft-mtp"), ("ngram-simple",), ("ngram-map-k",), ("ngram-cache",),
             ("draft-simple",), ("ngram-simple", "draft-simple")]
    for t in types:
        for n_max in (1, 2, 3):
            spec = SpecConfig(types=t, n_max=n_max, adaptive=False, ngram=NGRAM, draft_model="tiny")
            got, timings = generate(runner, spec, prompt, 48, draft_runner=draft if "draft-simple" in t else None)
            assert got == plain, f"{','.join(t)} n_max={n_max}"
            drafted += timings["draft_n"]
            accepted += timings["draft_n_accepted"]
            if t == ("draft-mtp",):
                assert timings["draft_n"] > 0
    assert 0 < accepted < drafted


def test_mtp_chain_drafts_up_to_one_token_per_block(spec_runner):
    """draft-mtp at n-max 3 with 3 blocks drafts 3 tokens a step (llama.cpp caps n-max at the block count),
    and the tiny model's blocks draft well: most are accepted; output equals plain decoding."""
    from test_speculative import generate

    from nextn.spec.speculator import SpecConfig

    prompt = spec_runner.tokenizer.encode("one two three four", True, False)
    plain, _ = generate(spec_runner, None, prompt, 24)
    got, t = generate(spec_runner, SpecConfig(types=("draft-mtp",), n_max=3, adaptive=False), prompt, 24)
    assert got == plain
    assert t["draft_n"] >= 3 * 4 and t["draft_n_accepted"] > t["draft_n"] // 2


@pytest.mark.slow
@pytest.mark.parametrize("draft_vocab", [0, 100])
def test_sampled_speculation_keeps_the_distribution(tmp_path, draft_vocab):
    """Temperature > 0 with the chained blocks drafting (n-max 3 over 3 blocks): the chi-square test of
    tests/test_speculative.py on a step35 model, with the full heads and with reduced ones (FR-Spec)."""
    from test_speculative import test_sampled_output_distribution_unchanged_by_speculation as check

    check(tmp_path, "step35", draft_vocab)


@pytest.mark.slow
def test_server_parallel_four_slots_with_mtp_and_prompt_cache(models):
    """`nextn serve` with 4 slots, draft-mtp over the three chained blocks and the prompt cache (prompts
    longer than a sliding layer's ring, repeated: hits that keep, and ones that cannot keep, a prefix): every
    output equals the same request served alone without speculation."""
    import concurrent.futures

    from test_server import _short_dir, start, stop
    from test_server_spec import PROMPTS, complete

    model = models("Q8_0")
    d = _short_dir()
    plain_sock, spec_sock = d / "plain.sock", d / "spec.sock"
    plain = start(model, plain_sock, "-np", "1")
    spec = start(model, spec_sock, "-np", "4", "--spec-type", "draft-mtp", "--spec-draft-n-max", "3")
    try:
        want = {p: complete(plain_sock, p)["choices"][0]["text"] for p in PROMPTS}
        for _ in range(2):
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                results = list(ex.map(lambda p: (p, complete(spec_sock, p)), PROMPTS * 2))
            for p, body in results:
                assert body["choices"][0]["text"] == want[p]
        t = results[0][1]["timings"]
        assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
    finally:
        stop(plain)
        stop(spec)
