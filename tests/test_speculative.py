"""Speculative decoding in the scheduler: every drafter and a chain, on every architecture (MTP on those with
the block), greedy output token-identical to plain decoding at n-max 1, 2, 3 and 8."""

import queue
from pathlib import Path

import numpy as np
import pytest

from nextn.runner import ModelRunner
from nextn.scheduler import Request, Scheduler
from nextn.spec.ngram import NgramParams
from nextn.spec.speculator import SpecConfig
from nextn.devtools.tiny import make_tiny
from test_scheduler import collect, run

# small n-gram sizes: the tiny models' outputs repeat within a few dozen tokens
NGRAM = NgramParams(ngram_simple_size_n=2, ngram_simple_size_m=8, ngram_map_k_size_n=2, ngram_map_k_size_m=8,
                    ngram_map_k4v_size_n=2, ngram_map_k4v_size_m=8, ngram_mod_n_match=3, ngram_mod_n_min=1,
                    ngram_mod_n_max=8)
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
ARCHS = ("qwen3", "llama", "qwen2", "qwen35", "qwen35moe", "glm4moe")
MTP_ARCHS = ("qwen35", "qwen35moe", "glm4moe")


def run_request(sched, req):
    q = queue.Queue()
    req.sink = q.put
    sched.submit(req)
    return q


@pytest.fixture(scope="module", params=ARCHS)
def runner(request, tmp_path_factory):
    arch = request.param
    mtp = arch in MTP_ARCHS
    path = make_tiny(tmp_path_factory.mktemp("spec") / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=5, mtp=mtp)
    return ModelRunner(path, n_ctx=256, n_seq=2, n_batch=32, mtp=mtp, speculative=True)


@pytest.fixture(scope="module")
def draft_runners(tmp_path_factory):
    """draft-simple's models: a different random qwen3 (drafts mostly rejected) and a dense copy of the
    target's own vocabulary and weights family (qwen3 seed 5: drafts right whenever the target is qwen3)."""
    d = tmp_path_factory.mktemp("draft")
    return [ModelRunner(make_tiny(d / f"draft{seed}.gguf", arch="qwen3", qtype="Q8_0", seed=seed), n_ctx=256,
                        n_seq=2, n_batch=32) for seed in (9, 5)]


def generate(runner, spec, prompt, n=32, draft_runner=None):
    sched = Scheduler(runner, 2, spec=spec, draft_runner=draft_runner)
    for i in range(2):
        sched.cache.forget(i)
    sched.start()
    try:
        toks, _, done = collect(run(sched, prompt, n, ignore_eos=True)[1])
    finally:
        sched.drain(0)
    return toks, done.timings


def test_greedy_output_identical_with_every_drafter(runner, draft_runners):
    tok = runner.tokenizer
    p0 = tok.encode("one two three four", True, False)
    first, _ = generate(runner, None, p0, 12)
    # the continuation of p0 already in the prompt: n-gram drafts are right for 12 tokens, then wrong
    prompt = p0 + first + p0
    plain, _ = generate(runner, None, prompt)
    types = [(t,) for t in NGRAM_TYPES] + [("ngram-mod", "ngram-simple")]
    if runner.has_mtp:
        types += [("draft-mtp",), ("ngram-mod", "draft-mtp")]
    types += [("draft-simple",), ("ngram-simple", "draft-simple")]
    drafted = accepted = 0
    for t in types:
        for n_max in (1, 2, 3, 8):
            spec = SpecConfig(types=t, n_max=n_max, adaptive=False, ngram=NGRAM, draft_model="tiny")
            for draft in draft_runners if "draft-simple" in t else [None]:
                got, timings = generate(runner, spec, prompt, draft_runner=draft)
                assert got == plain, f"{','.join(t)} n_max={n_max}"
                drafted += timings["draft_n"]
                accepted += timings["draft_n_accepted"]
                assert timings["draft_n_accepted"] <= timings["draft_n"]
                if t in (("draft-mtp",), ("draft-simple",)):
                    assert timings["draft_n"] > 0, "a draft model drafts every step"
    assert 0 < accepted < drafted  # both paths ran: accepted drafts and rejections (with rollback)


def test_draft_model_must_share_the_vocabulary(tmp_path):
    from nextn.errors import ConfigError
    from nextn.spec.draft_model import DraftModel

    target = ModelRunner(make_tiny(tmp_path / "t.gguf", arch="qwen3", seed=1), n_ctx=64)
    vocab = Path(__file__).parent / "data" / "vocab" / "ggml-vocab-qwen35.gguf"
    other = ModelRunner(make_tiny(tmp_path / "o.gguf", arch="qwen3", seed=1, vocab=str(vocab)), n_ctx=64)
    with pytest.raises(ConfigError, match="vocabulary"):
        DraftModel(other, target)
    hybrid = ModelRunner(make_tiny(tmp_path / "h.gguf", arch="qwen35", seed=1), n_ctx=64)
    with pytest.raises(ConfigError, match="recurrent"):
        DraftModel(hybrid, target)


@pytest.mark.parametrize("arch,draft_vocab", [("qwen35", 0), ("glm4moe", 0), ("qwen35", 100)])
def test_sampled_output_distribution_unchanged_by_speculation(tmp_path, arch, draft_vocab):
    """Temperature > 0: the second generated token (the first one verified against MTP drafts sampled with
    their probabilities, by rejection sampling) follows the model's exact joint distribution of the first
    two tokens, computed from the plain model. Chi-square at significance 0.001 over 1500 seeded requests.
    draft_vocab: the drafts come from a reduced head (FR-Spec; 100 of 396 tokens), whose distribution is
    zero on the other tokens - rejection sampling must still give the model's distribution."""
    from nextn.sampling import Sampler, SamplingParams
    from test_spec_verify import chi_square

    path = make_tiny(tmp_path / "m.gguf", arch=arch, qtype="Q8_0", seed=5, mtp=True)
    runner = ModelRunner(path, n_ctx=128, n_seq=2, n_batch=32, mtp=True, speculative=True, draft_vocab=draft_vocab)
    params = dict(temperature=6.0, top_k=4, top_p=1.0, min_p=0.0)
    prompt = runner.tokenizer.encode("one two three", True, False)
    # the exact joint distribution of (x1, x2) under the request's sampler chain
    plain = ModelRunner(path, n_ctx=128, n_batch=32)
    sampler = Sampler(SamplingParams(**params))
    _, lg = plain.eval(0, prompt, 0)
    p1 = sampler.probs(lg[-1])
    joint = {}
    for x1 in np.flatnonzero(p1):
        _, lg2 = plain.eval(0, prompt + [int(x1)], 0)
        p2 = sampler.probs(lg2[-1])
        for x2 in np.flatnonzero(p2):
            joint[int(x1), int(x2)] = float(p1[x1] * p2[x2])
    if draft_vocab:  # the case is only a test if the model often wants a token the drafts cannot propose
        kept = set(runner.draft_ids.tolist())
        assert sum(p for (_, x2), p in joint.items() if x2 not in kept) > 0.05
    spec = SpecConfig(types=("draft-mtp",), n_max=3, adaptive=False)
    sched = Scheduler(runner, 2, spec=spec)
    sched.start()
    counts, drafted = {}, 0
    try:
        for seed in range(1500):
            # 3 tokens: room for a draft of the second (speculation never drafts past max_tokens)
            req = Request(list(prompt), 3, SamplingParams(seed=seed, **params), ignore_eos=True, sink=None)
            toks, _, done = collect(run_request(sched, req))
            counts[tuple(toks[:2])] = counts.get(tuple(toks[:2]), 0) + 1
            drafted += done.timings["draft_n"]
    finally:
        sched.drain(0)
    assert drafted > 1000  # the second token really went through verification
    chi2, df, p = chi_square(counts, joint)
    assert p > 0.001, f"chi2 {chi2:.1f} with {df} degrees of freedom, p = {p:.2g}"


def test_synthetic_acceptance_is_marked_and_follows_the_rates(tmp_path):
    """--spec-synth-rates: benchmarking only. The acceptance profile is the configured one, whatever the
    drafts, and the timings say the output is synthetic."""
    path = make_tiny(tmp_path / "m.gguf", arch="qwen3", qtype="Q8_0", seed=5)
    runner = ModelRunner(path, n_ctx=256, n_seq=2, n_batch=32, speculative=True)
    spec = SpecConfig(types=("ngram-simple",), n_max=1, adaptive=False, synth_rates=(0.5,),
                      ngram=NgramParams(ngram_simple_size_n=1, ngram_simple_size_m=2))
    prompt = runner.tokenizer.encode("a a a a a a a a", True, False)
    toks, timings = generate(runner, spec, prompt, n=200)
    assert timings["speculative_synthetic"] is True
    assert timings["draft_n"] > 100
    # one-token drafts accepted at rate 0.5 (about 130 drafts: 0.35..0.65 is beyond 3 standard deviations)
    rate = timings["draft_n_accepted"] / timings["draft_n"]
    assert 0.35 < rate < 0.65, rate


def test_drafts_fit_a_small_batch_with_busy_slots(tmp_path):
    """4 slots drafting up to 8 tokens each in batches of 8 tokens: drafts shrink to what the batch and the
    output rows hold (a prompt arriving meanwhile still gets its token), and outputs equal plain decoding."""
    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", qtype="Q8_0", seed=5, mtp=True)
    runner = ModelRunner(path, n_ctx=256, n_seq=4, n_batch=8, mtp=True, speculative=True)
    prompts = [runner.tokenizer.encode(t, True, False) for t in ("a b c", "hello there", "x y z w v", "1 2 3")]

    def serve(spec):
        sched = Scheduler(runner, 4, spec=spec)
        for i in range(4):
            sched.cache.forget(i)
        sched.start()
        try:
            qs = [run(sched, p, 20, ignore_eos=True)[1] for p in prompts[:3]]
            first = [q.get(timeout=30) for q in qs]  # the three are generating (and drafting)
            q4 = run(sched, prompts[3], 20, ignore_eos=True)[1]  # arrives mid-speculation
            out = []
            for ev, q in zip(first, qs):
                toks = collect(q)[0]
                out.append([ev.token, *toks])
            return out + [collect(q4)[0]]
        finally:
            sched.drain(0)

    plain = serve(None)
    assert serve(SpecConfig(types=("draft-mtp",), n_max=8, adaptive=False)) == plain


def test_bad_speculative_settings_are_refused_up_front():
    from nextn.errors import ConfigError, RequestError
    from nextn.spec.speculator import parse_types

    with pytest.raises(ValueError, match="unknown speculative type"):
        parse_types("ngram-mod,bogus")
    with pytest.raises(ValueError, match="cannot be combined"):
        parse_types("none,draft-mtp")
    with pytest.raises(ConfigError, match="--spec-draft-model"):
        SpecConfig(types=("draft-simple",)).check()
    with pytest.raises(ConfigError, match="spec-synth-rates"):
        SpecConfig(types=("ngram-mod",), n_max=2, synth_rates=(0.5, 0.9)).check()  # must not increase
    base = SpecConfig(types=("ngram-mod",))
    assert base.for_request({"speculative.n_max": 5, "speculative.ngram_size_n": 4}).n_max == 5
    with pytest.raises(RequestError, match="speculative"):
        base.for_request({"speculative.n_max": -1})
    with pytest.raises(RequestError, match="enabled at server start"):
        base.for_request({"speculative.type": "draft-mtp"})


def test_per_request_speculative_fields_keep_the_bounds_of_their_flags():
    """speculative.n_max of 10**9 or 10**30 once took the scheduler thread down (every later request hung):
    each request field is held to the type and range of the flag it overrides, named in the 400."""
    from nextn.errors import RequestError

    base = SpecConfig(types=("ngram-mod",))
    for body, message in [
        ({"speculative.n_max": 10**9}, r"'speculative\.n_max': 1000000000 \(allowed a value 0 \.\. 63\)"),
        ({"speculative.n_max": 10**30}, r"'speculative\.n_max'.*0 \.\. 63"),
        ({"speculative.n_max": 64}, r"'speculative\.n_max'"),
        ({"speculative.n_max": float("inf")}, r"'speculative\.n_max'.*an integer"),
        ({"speculative.n_max": "3"}, r"'speculative\.n_max'.*an integer"),
        ({"speculative.n_min": 10**9}, r"'speculative\.n_min'.*0 \.\. 63"),
        ({"speculative.p_min": float("nan")}, r"'speculative\.p_min'.*finite"),
        ({"speculative.p_min": 1e308}, r"'speculative\.p_min'.*0\.0 \.\. 1\.0"),
        ({"speculative.type": 5}, r"'speculative\.type'.*a string"),
        ({"speculative.ngram_size_n": 10**9}, r"ngram-simple-size-n.*between 1 and 1024"),
        ({"speculative.ngram_size_m": -1}, r"'speculative\.ngram_size_m'.*>= 0"),
    ]:
        with pytest.raises(RequestError, match=message):
            base.for_request(body)
    got = base.for_request({"speculative.n_max": 63.0, "speculative.n_min": 2, "speculative.p_min": 1,
                            "speculative.ngram_size_m": 1024})
    assert (got.n_max, got.n_min, got.p_min, got.ngram.ngram_simple_size_m) == (63, 2, 1.0, 1024)
    assert isinstance(got.n_max, int) and isinstance(got.p_min, float)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_stop_at_the_end_of_the_context(tmp_path, monkeypatch, temperature):
    """Generating up to the end of a small context with long drafts: no drafter (the MTP head, the draft
    model) ever runs a position past the context. MTP drafts there once gave NaN logits that failed the step
    of every request. The request ends with "length" at the context's end - not earlier when the last step
    accepted several drafts - with the tokens of plain decoding."""
    from nextn.sampling import SamplingParams

    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", qtype="Q8_0", seed=5, mtp=True)
    n_ctx = 64
    runner = ModelRunner(path, n_ctx=n_ctx, n_seq=2, n_batch=32, mtp=True, speculative=True)
    draft = ModelRunner(make_tiny(tmp_path / "d.gguf", arch="qwen3", qtype="Q8_0", seed=5), n_ctx=n_ctx, n_seq=2,
                        n_batch=32)
    seen = []
    for r, name in ((runner, "mtp_step"), (draft, "step")):
        inner = getattr(r, name)

        def record(ids, pos, *a, _inner=inner, **k):
            seen.append(int(np.max(pos)))
            return _inner(ids, pos, *a, **k)

        monkeypatch.setattr(r, name, record)
    params = SamplingParams(temperature=temperature, seed=1)
    prompts = ([5, 6, 7], list(range(5, 5 + 50)))
    plain = [generate(runner, None, p, 400)[0] for p in prompts] if params.greedy else None
    for types in (("draft-mtp",), ("draft-simple",)):
        spec = SpecConfig(types=types, n_max=8, adaptive=False, draft_model="tiny")
        sched = Scheduler(runner, 2, spec=spec, draft_runner=draft if "draft-simple" in types else None)
        for i in range(2):
            sched.cache.forget(i)
        sched.start()
        try:
            for i, prompt in enumerate(prompts):
                seen.clear()
                toks, _, done = collect(run(sched, prompt, 400, params, ignore_eos=True)[1])
                assert done.finish_reason == "length" and len(prompt) + len(toks) == n_ctx, types
                assert plain is None or toks == plain[i], types  # the context ends where plain decoding ends
                assert done.timings["draft_n"] > 0 and seen, types
                assert max(seen) < n_ctx, f"{types}: a draft at position {max(seen)} of a {n_ctx}-token context"
        finally:
            sched.drain(0)
