"""The scheduler on a hybrid (qwen35) model: continuous batching over recurrent state, and the prompt cache
with snapshots (a recurrent state cannot be cut back, so reuse is whole-sequence or snapshot or nothing)."""

import pytest

from nextn.runner import ModelRunner
from nextn.scheduler import Scheduler
from nextn.devtools.tiny import make_tiny
from test_scheduler import GREEDY, collect, prompts, run


@pytest.fixture(scope="module", params=["qwen35", "qwen35moe"])
def runner(request, tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("sched35") / "m.gguf", arch=request.param, qtype="Q8_0", seed=1)
    return ModelRunner(path, n_ctx=256, n_seq=4, n_batch=32)


@pytest.fixture
def sched(runner):
    s = Scheduler(runner, 4, max_queue=4)
    for i in range(4):
        s.cache.forget(i)
    s.start()
    yield s
    s.drain(0)


def test_four_slots_together_equal_each_alone(runner, sched):
    ps = prompts(runner)
    alone = []
    for p in ps:
        alone.append(collect(run(sched, p, 16, ignore_eos=True)[1])[0])
        for i in range(4):
            sched.cache.forget(i)
    qs = [run(sched, p, 16, ignore_eos=True)[1] for p in ps]
    assert [collect(q)[0] for q in qs] == alone


def test_prompt_cache_with_snapshots(runner, sched):
    tok = runner.tokenizer
    base = tok.encode("A shared system prompt that many requests start with, long enough to matter. ", True, False)
    p1 = base + tok.encode("First question?", False, False)
    p2 = base + tok.encode("Second question!", False, False)
    ref1 = collect(run(sched, p1, 12, ignore_eos=True)[1])[0]
    for i in range(4):
        sched.cache.forget(i)
    ref2 = collect(run(sched, p2, 12, ignore_eos=True)[1])[0]
    # the same prompt again: the snapshot taken before its last token is reused
    toks, _, done = collect(run(sched, p2, 12, ignore_eos=True)[1])
    assert done.timings["cache_n"] == len(p2) - 1 and toks == ref2
    # a prompt that shares only the system prompt cannot cut the recurrent state back there: recomputed
    toks, _, done = collect(run(sched, p1, 12, ignore_eos=True)[1])
    assert toks == ref1
    # a follow-up that extends a whole cached sequence (prompt + answer) continues from its state
    follow = p1 + ref1[:-1] + tok.encode(" And then?", False, False)
    toks, _, done = collect(run(sched, follow, 8, ignore_eos=True)[1])
    assert done.timings["cache_n"] == len(p1) + len(ref1) - 1
    for i in range(4):
        sched.cache.forget(i)
    fresh, _, done = collect(run(sched, follow, 8, ignore_eos=True)[1])
    assert done.timings["cache_n"] == 0 and toks == fresh
