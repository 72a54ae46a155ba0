"""engine/scheduler.py + engine/memory/prompt_cache.py on a tiny model: batching, cancellation, limits, reuse."""

import queue
import time

import numpy as np
import pytest

from nextn.errors import Overloaded, RequestError
from nextn.runner import ModelRunner
from nextn.sampling import SamplingParams
from nextn.scheduler import Request, Scheduler
from nextn.devtools.tiny import make_tiny

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sched") / "m.gguf", arch="qwen3", qtype="Q8_0", seed=1)


@pytest.fixture(scope="module")
def runner(model):
    # small n_batch so that long prompts are split into chunks that share steps with decode tokens
    return ModelRunner(model, n_ctx=256, n_seq=4, n_batch=32)


@pytest.fixture
def sched(runner):
    for s in range(runner.n_seq):
        runner.truncate(s, 0)
    s = Scheduler(runner, 4, max_queue=4)
    s.start()
    yield s
    s.drain(0)


def run(sched, prompt, max_tokens=20, params=GREEDY, **kw):
    q = queue.Queue()
    req = Request(list(prompt), max_tokens, params, sink=q.put, **kw)
    sched.submit(req)
    return req, q


def collect(q, timeout=30):
    tokens, text = [], ""
    while True:
        ev = q.get(timeout=timeout)
        if ev.kind == "token":
            tokens.append(ev.token)
            text += ev.text
        elif ev.kind == "done":
            return tokens, text, ev
        else:
            raise ev.error


def prompts(runner):
    tok = runner.tokenizer
    texts = ["The quick brown fox", "Once upon a time there was a very long story about " * 3,
             "hello", "1 2 3 4 5 6 7 8 9 10 11 12"]
    return [tok.encode(t, True, False) for t in texts]


def test_greedy_output_alone_equals_beside_three_others(runner, sched):
    ps = prompts(runner)
    alone = []
    for p in ps:
        toks, _, done = collect(run(sched, p, 24, ignore_eos=True)[1])
        alone.append(toks)
        assert done.finish_reason == "length" and len(toks) == 24
    # a fresh scheduler state: drop the prompt cache so every prompt is computed again, in shared steps
    for i in range(4):
        sched.cache.forget(i)
    qs = [run(sched, p, 24, ignore_eos=True)[1] for p in ps]
    together = [collect(q)[0] for q in qs]
    assert together == alone
    # and equal to a plain greedy loop over runner.eval on one sequence
    sched.cache.forget(0)
    top, _ = runner.eval(0, ps[1], 0, want_logits=False)
    plain = [int(top[-1])]
    while len(plain) < 24:
        top, _ = runner.eval(0, plain[-1:], len(ps[1]) + len(plain) - 1, want_logits=False)
        plain.append(int(top[-1]))
    sched.cache.forget(0)
    assert plain == alone[1]


def test_long_prompt_chunks_share_steps_with_decode(runner, sched):
    tok = runner.tokenizer
    short = tok.encode("hi", True, False)
    long = tok.encode("a long prompt that takes several chunks of thirty-two tokens " * 3, True, False)
    assert len(long) > 2 * runner.n_batch
    _, q1 = run(sched, short, 60, ignore_eos=True)
    q1.get(timeout=10)  # the short one is decoding
    steps0 = sched.counters.steps_total
    _, q2 = run(sched, long, 4, ignore_eos=True)
    collect(q2)
    collect(q1)
    # the long prompt needed >= 3 chunks; they ran in steps that also decoded the short request
    assert sched.counters.step_tokens_total > sched.counters.steps_total
    assert sched.counters.steps_total - steps0 < 60 + 4 + 3


def test_timings_usage_and_counters(runner, sched):
    p = prompts(runner)[0]
    toks, text, done = collect(run(sched, p, 8, ignore_eos=True)[1])
    t = done.timings
    assert t["prompt_n"] == len(p) and t["predicted_n"] == 8 == len(toks)
    assert t["draft_n"] == 0 and t["draft_n_accepted"] == 0
    assert t["prompt_ms"] > 0 and t["predicted_per_second"] > 0
    assert done.usage == {"prompt_tokens": len(p), "completion_tokens": 8, "total_tokens": len(p) + 8}
    assert sched.counters.requests_total >= 1 and sched.counters.predicted_tokens_total >= 8


def test_prompt_cache_reuses_own_slot_and_copies_from_others(runner, sched):
    tok = runner.tokenizer
    base = tok.encode("A shared system prompt that many requests start with, long enough to matter. ", True, False)
    p1 = base + tok.encode("First question?", False, False)
    p2 = base + tok.encode("Second question!", False, False)
    ref = collect(run(sched, p2, 12, ignore_eos=True)[1])[0]  # computed from scratch
    for i in range(4):
        sched.cache.forget(i)
    collect(run(sched, p1, 12, ignore_eos=True)[1])
    toks, _, done = collect(run(sched, p2, 12, ignore_eos=True)[1])
    assert done.timings["cache_n"] >= len(base) - 1
    assert done.timings["prompt_n"] == len(p2) - done.timings["cache_n"]
    assert toks == ref  # reuse does not change the output
    # the same prompt again: everything but the last token is reused
    toks, _, done = collect(run(sched, p2, 12, ignore_eos=True)[1])
    assert done.timings["cache_n"] == len(p2) - 1 and toks == ref


def test_copy_prefix_from_busy_slot_gives_same_output(runner, sched):
    tok = runner.tokenizer
    base = tok.encode("Copy me: a prefix that another slot computed a moment ago, repeated. " * 2, True, False)
    p2 = base + tok.encode("tail two", False, False)
    for i in range(4):
        sched.cache.forget(i)
    ref = collect(run(sched, p2, 10, ignore_eos=True)[1])[0]
    for i in range(4):
        sched.cache.forget(i)
    _, q1 = run(sched, base + tok.encode("tail one", False, False), 80, ignore_eos=True)
    q1.get(timeout=10)  # slot A holds the prefix and keeps decoding
    req2, q2 = run(sched, p2, 10, ignore_eos=True)
    toks, _, done = collect(q2)
    collect(q1)
    assert done.timings["cache_n"] >= len(base) - 1  # copied device-side from the busy slot
    assert toks == ref


def test_cancel_frees_slot_at_once(runner, sched):
    p = prompts(runner)[0]
    reqs = [run(sched, p, 200, ignore_eos=True) for _ in range(4)]
    for _, q in reqs:
        q.get(timeout=10)
    assert sched.busy_slots() == 4
    for req, _ in reqs:
        sched.cancel(req)
    deadline = time.time() + 5
    while sched.busy_slots() and time.time() < deadline:
        time.sleep(0.01)
    assert sched.busy_slots() == 0
    toks, _, done = collect(run(sched, p, 3)[1])
    assert done.finish_reason in ("length", "stop")


def test_too_long_prompt_refused_up_front_and_bad_requests(runner, sched):
    with pytest.raises(RequestError, match="context holds 256"):
        sched.submit(Request([1] * 256, 4))
    with pytest.raises(RequestError, match="empty"):
        sched.submit(Request([], 4))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sched.submit(Request([10**6], 4))
    # max_tokens past the context ends with "length" at the context's end
    toks, _, done = collect(run(sched, [5] * 250, 100, ignore_eos=True)[1])
    assert done.finish_reason == "length" and len(toks) == 6


def test_full_queue_is_overloaded_not_a_hang(runner, sched):
    p = prompts(runner)[0]
    held = [run(sched, p, 400, ignore_eos=True) for _ in range(8)]  # 4 slots + 4 queued
    with pytest.raises(Overloaded, match="max_queue"):
        run(sched, p, 4)
    for req, _ in held:
        sched.cancel(req)


def test_sampled_request_with_seed_reproduces_and_logprobs(runner, sched):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    p = prompts(runner)[2]
    a = collect(run(sched, p, 16, params, ignore_eos=True)[1])[0]
    b = collect(run(sched, p, 16, params, ignore_eos=True)[1])[0]
    assert a == b
    q = run(sched, p, 3, GREEDY, n_probs=3)[1]
    ev = q.get(timeout=10)
    assert len(ev.top_logprobs) == 3 and ev.top_logprobs[0][0] == ev.token
    assert ev.logprob == pytest.approx(ev.top_logprobs[0][1]) and ev.logprob <= 0
    assert np.isclose(sum(np.exp(lp) for _, lp in ev.top_logprobs), 1.0) or sum(
        np.exp(lp) for _, lp in ev.top_logprobs) < 1.0
    collect(q)


def test_drain_lets_running_finish_and_refuses_new(runner):
    s = Scheduler(runner, 2, max_queue=2)
    s.start()
    _, q = run(s, prompts(runner)[0], 10, ignore_eos=True)
    assert s.drain(10) is True
    assert collect(q)[2].finish_reason == "length"
    with pytest.raises(Overloaded, match="shutting down"):
        run(s, [1, 2], 2)


def test_ignore_eos_bans_end_of_generation_tokens(runner, sched):
    """As llama-server: ignore_eos makes the end-of-generation tokens' logits -inf, so the text continues as
    the model would write it - never an end token followed by more text."""
    tok = runner.tokenizer
    eog = min(tok.eot_ids)
    prompt = [5, 6, eog]  # the tied tiny head predicts the last token again: left alone, the next is eog
    toks, _, done = collect(run(sched, prompt, 8)[1])
    assert toks == [eog] and done.finish_reason == "stop"
    toks, _, done = collect(run(sched, prompt, 8, ignore_eos=True)[1])
    assert len(toks) == 8 and not set(toks) & tok.eot_ids and done.finish_reason == "length"
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    for _ in range(3):
        toks, _, _ = collect(run(sched, prompt, 8, params=sampled, ignore_eos=True)[1])
        assert len(toks) == 8 and not set(toks) & tok.eot_ids


def test_a_request_that_cannot_start_fails_alone(runner, sched):
    """A request whose own settings fail when its slot starts (here a draft length no flag allows, which once
    killed the worker: every later request hung) gets an error event; the others are served."""
    from nextn.spec.speculator import SpecConfig

    p = prompts(runner)[0]
    want = collect(run(sched, p, 8, ignore_eos=True)[1])[0]
    bad = SpecConfig(types=("ngram-simple",), n_max=10**30)
    _, q = run(sched, p, 8, spec=bad)
    ev = q.get(timeout=10)
    assert ev.kind == "error" and "internal error" in str(ev.error)
    assert sched.failure is None and sched.busy_slots() == 0
    assert collect(run(sched, p, 8, ignore_eos=True)[1])[0] == want


def test_a_dead_worker_ends_every_request_and_refuses_new_ones(runner):
    """Whatever kills the worker thread (even a BaseException such as SystemExit): the running and queued
    requests get an error event saying so, submit refuses, `failure` holds the cause and on_failure is told
    (the server then fails /health and exits for systemd to restart it)."""
    s = Scheduler(runner, 1, max_queue=4)
    s.cache.forget(0)
    told = []
    s.on_failure = told.append
    steps = 0
    step = s._step

    def dying_step():
        nonlocal steps
        steps += 1
        if steps == 5:
            raise SystemExit(3)
        step()

    s._step = dying_step
    s.start()
    p = prompts(runner)[0]
    _, running = run(s, p, 50, ignore_eos=True)
    _, queued = run(s, p, 50, ignore_eos=True)
    for q in (running, queued):
        ev = q.get(timeout=10)
        while ev.kind == "token":
            ev = q.get(timeout=10)
        assert ev.kind == "error" and "scheduler stopped (SystemExit: 3)" in str(ev.error)
        assert ev.error.http_status == 503
    s._thread.join(5)
    assert not s._thread.is_alive()
    assert isinstance(s.failure, SystemExit) and told == [s.failure]
    with pytest.raises(Overloaded, match="scheduler stopped"):
        run(s, p, 4)
    assert s.drain(1) is True


def test_idle_worker_keeps_its_heartbeat(runner):
    """The watchdog reports the worker's heartbeat, which an idle worker keeps beating; a worker stuck in
    a step stops beating."""
    s = Scheduler(runner, 1)
    s.beat_every = 0.02
    s.start()
    try:
        time.sleep(0.3)
        assert s.seconds_since_heartbeat() < 0.2
        step = s._step
        s._step = lambda: (time.sleep(0.6), step())  # a hung device
        _, q = run(s, prompts(runner)[0], 2)
        time.sleep(0.4)
        assert s.seconds_since_heartbeat() > 0.3
        collect(q)
    finally:
        s.drain(0)


@pytest.mark.parametrize("speculative", [False, True])
def test_a_request_whose_logits_fail_ends_alone(runner, monkeypatch, speculative):
    """NaN logits in one request's rows (its first token, or later: sampled, or verified against its
    drafts) end that request with an error event; the request beside it streams on with the output it has
    alone. Once, such a failure ended every request in the step."""
    from nextn.spec.ngram import NgramParams
    from nextn.spec.speculator import SpecConfig

    spec = SpecConfig(types=("ngram-simple",), n_max=3, adaptive=False,
                      ngram=NgramParams(ngram_simple_size_n=1, ngram_simple_size_m=4)) if speculative else None
    s = Scheduler(runner, 4, spec=spec)
    for i in range(4):
        s.cache.forget(i)
    poison = {}  # seed of a request -> tokens it generates before its rows turn NaN
    step = runner.step

    def poisoned(ids, pos, seq, out_rows, want_logits=False):
        top, logits = step(ids, pos, seq, out_rows, want_logits)
        if logits is not None:
            logits = logits.copy()
            for j, row in enumerate(out_rows):
                slot = s.slots[seq[row]]
                if slot.req is not None and slot.n_gen >= poison.get(slot.req.params.seed, 10**9):
                    logits[j] = np.nan
        return top, logits

    monkeypatch.setattr(runner, "step", poisoned)
    s.start()
    try:
        sampled = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        victim = SamplingParams(seed=7, **sampled)
        p = prompts(runner)
        alone = collect(run(s, p[1], 40, victim, ignore_eos=True)[1])[0]
        for i in range(4):
            s.cache.forget(i)
        poison.update({100: 0, 101: 2})
        _, qv = run(s, p[1], 40, victim, ignore_eos=True)
        _, qa = run(s, p[0], 40, SamplingParams(seed=100, **sampled), ignore_eos=True)
        _, qb = run(s, p[3], 40, SamplingParams(seed=101, **sampled), ignore_eos=True)
        for q, n in ((qa, 0), (qb, 2)):
            evs = [q.get(timeout=30)]
            while evs[-1].kind == "token":
                evs.append(q.get(timeout=30))
            assert evs[-1].kind == "error" and "NaN" in str(evs[-1].error)
            assert len(evs) - 1 <= n + (3 if speculative else 0)
        assert collect(qv)[0] == alone
        assert s.busy_slots() == 0 and s.failure is None
    finally:
        s.drain(0)
