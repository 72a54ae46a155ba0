"""Speculative decoding in the scheduler: every drafter and a chain, on every architecture (MTP on the hybrid
models with the block), greedy output token-identical to plain decoding at n-max 1, 2, 3 and 8."""

import pytest

from nextn.runner import ModelRunner
from nextn.scheduler import Scheduler
from nextn.spec.ngram import NgramParams
from nextn.spec.speculator import SpecConfig
from nextn.tiny import make_tiny
from test_scheduler import collect, run

# small n-gram sizes: the tiny models' outputs repeat within a few dozen tokens
NGRAM = NgramParams(ngram_simple_size_n=2, ngram_simple_size_m=8, ngram_map_k_size_n=2, ngram_map_k_size_m=8,
                    ngram_map_k4v_size_n=2, ngram_map_k4v_size_m=8, ngram_mod_n_match=3, ngram_mod_n_min=1,
                    ngram_mod_n_max=8)
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
ARCHS = ("qwen3", "llama", "qwen35", "qwen35moe")


@pytest.fixture(scope="module", params=ARCHS)
def runner(request, tmp_path_factory):
    arch = request.param
    mtp = arch.startswith("qwen35")
    path = make_tiny(tmp_path_factory.mktemp("spec") / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=5, mtp=mtp)
    return ModelRunner(path, n_ctx=256, n_seq=2, n_batch=32, mtp=mtp, speculative=True)


def generate(runner, spec, prompt, n=32):
    sched = Scheduler(runner, 2, spec=spec)
    for i in range(2):
        sched.cache.forget(i)
    sched.start()
    try:
        toks, _, done = collect(run(sched, prompt, n, ignore_eos=True)[1])
    finally:
        sched.drain(0)
    return toks, done.timings


def test_greedy_output_identical_with_every_drafter(runner):
    tok = runner.tokenizer
    p0 = tok.encode("one two three four", True, False)
    first, _ = generate(runner, None, p0, 12)
    # the continuation of p0 already in the prompt: n-gram drafts are right for 12 tokens, then wrong
    prompt = p0 + first + p0
    plain, _ = generate(runner, None, prompt)
    types = [(t,) for t in NGRAM_TYPES] + [("ngram-mod", "ngram-simple")]
    if runner.has_mtp:
        types += [("draft-mtp",), ("ngram-mod", "draft-mtp")]
    drafted = accepted = 0
    for t in types:
        for n_max in (1, 2, 3, 8):
            spec = SpecConfig(types=t, n_max=n_max, adaptive=False, ngram=NGRAM)
            got, timings = generate(runner, spec, prompt)
            assert got == plain, f"{','.join(t)} n_max={n_max}"
            drafted += timings["draft_n"]
            accepted += timings["draft_n_accepted"]
            assert timings["draft_n_accepted"] <= timings["draft_n"]
            if t == ("draft-mtp",):
                assert timings["draft_n"] > 0, "the MTP head drafts every step"
    assert 0 < accepted < drafted  # both paths ran: accepted drafts and rejections (with rollback)
