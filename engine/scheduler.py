"""Slots, a bounded queue and continuous batching on one worker thread.

Each slot owns one KV sequence. The worker packs every step with the decode token of each generating slot
first (so running streams never stall), then prompt chunks of starting slots up to n_batch, and runs it
as one runner.step: a long prompt of one request is processed beside the decode tokens of the others.
The runner's native plan releases the GIL while OpenCL runs, so the asyncio thread keeps serving.

Requests talk back through `Request.sink(event)`, called on the worker thread; the server passes a sink
that hands events to its event loop with loop.call_soon_threadsafe. A cancelled request (client gone)
leaves its slot before the next step. A prompt that does not fit the context is refused at submit, a full
queue raises Overloaded (503) at submit: nothing waits without bound.

Failures stay with whoever caused them: a request that cannot start, or whose logits, sampler, drafts or
verification fail, ends alone with an error event; a failed device step ends the requests in it. If the
worker itself dies, every request is ended, `failure` says why, submit refuses, and `on_failure` tells the
server, which then exits for systemd to restart it. The worker's heartbeat (also while idle) is what the
watchdog reports.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from nextn.errors import ConfigError, NextnError, Overloaded, RequestError
from nextn.memory.prompt_cache import PromptCache
from nextn.sampling import Sampler, SamplingParams
from nextn.spec.adaptive import StepCost
from nextn.spec.draft_model import DraftModel
from nextn.spec.drafter import Advance
from nextn.spec.mtp import MtpDrafter
from nextn.spec.ngram import NgramShared
from nextn.spec.speculator import SlotSpec, SpecConfig
from nextn.stops import StopMatcher

log = logging.getLogger("nextn.scheduler")
_ids = itertools.count(1)


@dataclass
class Event:
    kind: str  # "token" (a generated token; text may be "" while held back), "done", "error"
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # done: "stop" (eos or stop string) or "length"
    timings: dict | None = None
    usage: dict | None = None
    error: NextnError | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n_probs: int = 0  # top log-probabilities to report per token (0: none)
    sink: Callable[[Event], None] = lambda ev: None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    cancelled: bool = False
    slot: int | None = None  # set when it starts
    spec: SpecConfig | None = None  # per-request speculative settings (None: the server's)

    def cancel(self) -> None:
        """Thread-safe: the worker drops the request before its next step."""
        self.cancelled = True


@dataclass
class Counters:
    """Totals since start, read by /metrics."""

    requests_total: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens_total: int = 0
    prompt_seconds_total: float = 0.0
    prompt_cache_tokens_total: int = 0
    predicted_tokens_total: int = 0
    predicted_seconds_total: float = 0.0
    drafted_tokens_total: int = 0
    drafted_accepted_total: int = 0
    steps_total: int = 0
    step_tokens_total: int = 0


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.req: Request | None = None

    def start(self, req: Request, reused: int, tokenizer, spec: SpecConfig, cost: StepCost, shared) -> None:
        self.req = req
        self.spec = SlotSpec(spec, cost, req.params.seed, shared) if spec.enabled else None
        if self.spec is not None:
            self.spec.start(req.prompt)
        self.reused = reused
        self.prompt_pos = reused  # next prompt token to evaluate
        self.n_past = reused  # positions of this sequence whose KV is valid
        self.last_token = None
        self.history = list(req.prompt)
        # ignore_eos bans the end-of-generation tokens (logit -inf), as llama-server does
        self.sampler = Sampler(req.params, tokenizer.eot_ids if req.ignore_eos else ())
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopMatcher(req.stop)
        self.n_gen = 0
        self.t_start = time.perf_counter()
        self.t_first = None

    @property
    def prefilling(self) -> bool:
        return self.prompt_pos < len(self.req.prompt)


class Scheduler:
    def __init__(self, runner, n_slots: int | None = None, max_queue: int = 64, spec: SpecConfig | None = None,
                 draft_runner=None):
        self.runner = runner
        self.spec = (spec or SpecConfig()).check()
        self.step_cost = StepCost()  # measured step times by batch size, shared by the slots' controllers
        self.batch_drafters = []  # the device drafters: they draft for all slots at once
        if self.spec.uses_draft_model:
            if draft_runner is None:
                raise ConfigError("draft-simple: the draft model is not loaded (--spec-draft-model)")
            self.batch_drafters.append(DraftModel(draft_runner, runner, self.step_cost))
        if self.spec.uses_mtp:
            if not runner.has_mtp:
                raise ConfigError(f"{runner.file.path.name}: --spec-type draft-mtp needs the model's MTP block "
                                  f"loaded (architecture {runner.file.arch}; see `nextn inspect`)")
            self.batch_drafters.append(MtpDrafter(runner, self.step_cost))
        if self.spec.enabled and runner.holds_recurrent_state and not runner.rollback_rows:
            raise ConfigError("speculation on a model with recurrent layers needs the runner built with "
                              "speculative=True (rollback state)")
        self.ngram_shared = NgramShared(self.spec.ngram)  # ngram-mod / ngram-cache tables, shared by slots
        self.n_slots = min(n_slots or runner.n_seq, runner.n_seq, runner.max_outputs)
        self.max_queue = max_queue
        self.slots = [_Slot(i) for i in range(self.n_slots)]
        self.cache = PromptCache(runner, self.n_slots)
        # A recurrent state cannot be cut back to an earlier position, so a hybrid model's slot saves a
        # snapshot just before its last prompt token: the same prompt again (a regenerate) or one sharing all
        # but its tail then reuses everything up to there instead of recomputing from 0.
        self._snapshot_before_last = runner.holds_recurrent_state
        self.counters = Counters()
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()  # the worker's last sign of life: each loop, each step, idle waits
        self.beat_every = 1.0  # seconds between heartbeats of an idle worker (the watchdog wants them faster)
        self.failure: BaseException | None = None  # what killed the worker
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the worker as it dies

    # ---- called from other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nextn-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        n_ctx = self.runner.n_ctx
        if not req.prompt:
            raise RequestError("the prompt is empty")
        if len(req.prompt) >= n_ctx:
            self.counters.requests_rejected += 1
            raise RequestError(
                f"the prompt has {len(req.prompt)} tokens, the context holds {n_ctx} "
                f"(it must leave room for one generated token; --ctx-size)"
            )
        if req.max_tokens < 1:
            raise RequestError(f"invalid value for max_tokens: {req.max_tokens} (must be >= 1)")
        vocab = self.runner.n_vocab
        if any(not 0 <= t < vocab for t in req.prompt):
            raise RequestError(f"the prompt has token ids outside the vocabulary 0..{vocab - 1}")
        with self._cv:
            if self.failure is not None:
                raise Overloaded(self.stopped_reason())
            if not self._accepting:
                raise Overloaded("the server is shutting down")
            if len(self._pending) >= self.max_queue + self._free_count():
                self.counters.requests_rejected += 1
                raise Overloaded(f"all {self.n_slots} slots are busy and {len(self._pending)} requests wait (max_queue)")
            self._pending.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._cv:
            self._cv.notify()

    def drain(self, timeout: float) -> bool:
        """Stop accepting, let queued and running requests finish for up to `timeout` seconds, then end the
        rest with an error event. Returns True if everything finished in time."""
        with self._cv:
            self._accepting = False
            deadline = time.monotonic() + timeout
            while self._pending or self._busy_count():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.05))
            clean = not (self._pending or self._busy_count())
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=10)
        return clean

    def queue_depth(self) -> int:
        return len(self._pending)

    def busy_slots(self) -> int:
        return self._busy_count()

    def seconds_since_heartbeat(self) -> float:
        """For the watchdog: how long ago the worker last showed progress (an idle one beats every
        `beat_every` seconds; a running step beats before and after the device runs it)."""
        return time.monotonic() - self._heartbeat

    def stopped_reason(self) -> str:
        e = self.failure
        return f"the scheduler stopped ({type(e).__name__}: {e}); the server is exiting"

    def slots_info(self) -> list[dict]:
        out = []
        for s in self.slots:
            req = s.req
            out.append({
                "id": s.index,
                "is_processing": req is not None,
                "id_task": req.id if req else None,
                "n_ctx": self.runner.n_ctx,
                "n_past": s.n_past if req else len(self.cache.tokens[s.index]),
                "n_prompt_tokens": len(req.prompt) if req else 0,
                "n_decoded": s.n_gen if req else 0,
                "cached_tokens": len(self.cache.tokens[s.index]),
            })
        return out

    # ---- worker thread

    def _free_count(self) -> int:
        return sum(s.req is None for s in self.slots)

    def _busy_count(self) -> int:
        return sum(s.req is not None for s in self.slots)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # whatever it is, the requests and the server must hear of it
            self._die(e)
            return
        self._end_all(Overloaded("the server is shutting down"),
                      Overloaded("the server shut down before the request finished"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                self._heartbeat = time.monotonic()
                while not self._stop and not self._pending and not self._busy_count():
                    self._cv.wait(self.beat_every)
                    self._heartbeat = time.monotonic()
                if self._stop:
                    return
                self._admit()
            self._drop_cancelled()
            if self._busy_count():
                try:
                    self._step()
                except Exception as e:  # the device step failed: every request in it fails, serving goes on
                    log.exception("step failed")
                    for s in self.slots:
                        if s.req is not None:
                            self._finish_error(s, _as_error(e))

    def _die(self, e: BaseException) -> None:
        """The worker is dying: end every request (nothing else would), refuse new ones, tell the server."""
        self.failure = e
        log.critical("the scheduler stopped: %s: %s", type(e).__name__, e, exc_info=e)
        with self._cv:
            self._accepting = False
        err = Overloaded(self.stopped_reason())
        try:
            self._end_all(err, err)
        finally:
            if self.on_failure is not None:
                self.on_failure(e)

    def _end_all(self, queued: NextnError, running: NextnError) -> None:
        with self._cv:
            leftovers = list(self._pending)
            self._pending.clear()
        for req in leftovers:
            req.sink(Event("error", error=queued))
        for s in self.slots:
            if s.req is not None:
                self._finish_error(s, running)

    def _admit(self) -> None:
        while self._pending:
            free = [s.index for s in self.slots if s.req is None]
            if not free:
                return
            req = self._pending.popleft()
            if req.cancelled:
                self.counters.requests_cancelled += 1
                continue
            try:
                place = self.cache.place(req.prompt, free)
                slot = self.slots[place.slot]
                req.slot = slot.index
                slot.start(req, place.reused, self.runner.tokenizer, req.spec or self.spec, self.step_cost,
                           self.ngram_shared)
            except Exception as e:  # this request's settings (its sampler, its drafters): it alone fails
                log.exception("request %s could not start", req.id, extra={"REQUEST_ID": req.id})
                if req.slot is not None and self.slots[req.slot].req is req:
                    self._finish_error(self.slots[req.slot], _as_error(e))
                else:
                    req.sink(Event("error", error=_as_error(e)))
                continue
            self.counters.prompt_cache_tokens_total += place.reused
            log.debug("request %s -> slot %d (%d prompt tokens, %d reused%s)", req.id, slot.index,
                      len(req.prompt), place.reused,
                      f" from slot {place.copied_from}" if place.copied_from is not None else "",
                      extra={"REQUEST_ID": req.id, "SLOT": slot.index})

    def _drop_cancelled(self) -> None:
        freed = False
        for s in self.slots:
            if s.req is not None and s.req.cancelled:
                log.info("request %s cancelled in slot %d", s.req.id, s.index,
                         extra={"REQUEST_ID": s.req.id, "SLOT": s.index})
                self.counters.requests_cancelled += 1
                s.req = None
                freed = True
        if freed:
            with self._cv:
                self._cv.notify_all()

    def _step(self) -> None:
        r = self.runner
        ids, pos, seq, out_rows, fed = [], [], [], [], []
        verify = []  # (slot, first row, drafts, draft probs) of each generating slot
        gen = [s for s in self.slots if s.req is not None and not s.prefilling]
        n_busy = self._busy_count()
        token_cap = r.n_batch - (r.n_batch // 2 if n_busy > len(gen) else 0)
        for d in self.batch_drafters:
            d.before_step(gen)
        for i, s in enumerate(gen):  # decode tokens (and their drafts) first, within the first out rows
            drafts, probs = [], None
            if s.spec is not None:
                # leave an output row for every other busy slot and a token for every other generating
                # one; while prompts wait, drafts take at most half the batch
                room = min(r.max_outputs - len(out_rows) - (n_busy - i), token_cap - len(ids) - (len(gen) - i),
                           self._draft_room(s))
                with self._alone(s):
                    drafts, probs = s.spec.propose(min(s.spec.k_next, room))
                if s.req is None:  # its drafter failed: the request has ended
                    continue
                if drafts:
                    r.save_for_rollback(s.index)
            row = len(ids)
            toks = [s.last_token, *drafts]
            ids.extend(toks)
            pos.extend(range(s.n_past, s.n_past + len(toks)))
            seq.extend([s.index] * len(toks))
            out_rows.extend(range(row, row + len(toks)))
            verify.append((s, row, drafts, probs))
        prompt_out = []
        for s in self.slots:  # then prompt chunks, as much as the batch holds
            budget = r.n_batch - len(ids)
            if budget <= 0:
                break
            if s.req is None or not s.prefilling:
                continue
            end = len(s.req.prompt)
            if self._snapshot_before_last and s.prompt_pos < end - 1:
                end -= 1  # the last token goes in the next step, after the snapshot
            chunk = s.req.prompt[s.prompt_pos : min(s.prompt_pos + budget, end)]
            start = s.prompt_pos
            fed.append((s, len(ids), chunk))
            ids.extend(chunk)
            pos.extend(range(start, start + len(chunk)))
            seq.extend([s.index] * len(chunk))
            s.prompt_pos += len(chunk)
            if not s.prefilling:
                prompt_out.append((s, len(out_rows)))
                out_rows.append(len(ids) - 1)
        live = [s for s, _, _, _ in verify] + [s for s, _ in prompt_out]
        want_logits = any(s.sampler.needs_logits or s.req.n_probs for s in live)
        self._heartbeat = time.monotonic()
        t0 = time.perf_counter()
        top, logits = r.step(ids, np.asarray(pos, np.int32), seq, out_rows, want_logits)
        self.step_cost.observe(len(ids), time.perf_counter() - t0)
        self._heartbeat = time.monotonic()
        self.counters.steps_total += 1
        self.counters.step_tokens_total += len(ids)
        for s, row, chunk in fed:  # prompt chunks
            s.n_past += len(chunk)
            self.cache.append(s.index, chunk)
            if self._snapshot_before_last and s.prompt_pos == len(s.req.prompt) - 1:
                r.snapshot(s.index)
        emitted = {}
        advanced = []  # (slot, first row, tokens the trunk took, token emitted after them) of generating slots
        for s, row in prompt_out:  # the first generated token of a finished prompt
            with self._alone(s):
                lg = None if logits is None else logits[row]
                greedy = lg is None or not s.sampler.needs_logits
                token = int(top[row]) if greedy else s.sampler.sample(lg, s.history)
                emitted[s.index] = (s, [token], lg)
                self._emit(s, token, lg, s.n_past)
        for s, row, drafts, probs in verify:
            with self._alone(s):
                self._verify(s, row, drafts, probs, top, logits, emitted, advanced)
        for s, toks, _ in emitted.values():
            if s.req is not None and s.spec is not None:
                s.spec.extend(toks)
                s.spec.choose(len(emitted) - 1, self._draft_room(s))
        if self.batch_drafters:
            self._after_step(fed, advanced, emitted)

    def _verify(self, s: _Slot, row: int, drafts, probs, top, logits, emitted, advanced) -> None:
        """A generating slot's rows of the step: its drafts accepted or rolled back, its tokens emitted."""
        k = len(drafts)
        rows_top = top[row : row + k + 1]  # verify rows come first, every one of them an out row
        rows_lg = None if logits is None else logits[row : row + k + 1]
        if s.spec is None:
            a = 0
            greedy = rows_lg is None or not s.sampler.needs_logits
            token = int(rows_top[0]) if greedy else s.sampler.sample(rows_lg[0], s.history)
        else:
            a, token = s.spec.verify(drafts, probs, rows_top, rows_lg, s.sampler, s.history, self._eog(s))
            s.spec.observe(k, a)
            self.counters.drafted_tokens_total += k
            self.counters.drafted_accepted_total += a
            if a < k:
                self.runner.rollback(s.index, list(range(row, row + k + 1)), a + 1)
        fed_toks = [s.last_token, *drafts[:a]]
        s.n_past += len(fed_toks)
        self.cache.append(s.index, fed_toks)
        out = [*drafts[:a], token]
        emitted[s.index] = (s, out, None)
        advanced.append((s, row, fed_toks, token))
        for i, t in enumerate(out):
            lg = None if rows_lg is None else rows_lg[i]
            if not self._emit(s, t, lg, s.n_past - len(out) + 1 + i):
                break

    @contextlib.contextmanager
    def _alone(self, s: _Slot):
        """One request's own part of a step - its drafter, its sampler over its rows, its verification, its
        text. What fails there comes from that request's data (its settings, NaN logits in its rows), so it
        ends that request with an error event and the step goes on for the others. The batch's device work
        (the step, the device drafters) stays outside: its failure is everyone's."""
        try:
            yield
        except Exception as e:
            req = s.req
            if req is None:  # it had ended already
                log.exception("slot %d failed after its request ended", s.index)
                return
            log.exception("request %s failed in slot %d", req.id, s.index,
                          extra={"REQUEST_ID": req.id, "SLOT": s.index})
            self._finish_error(s, _as_error(e))

    def _after_step(self, fed, advanced, emitted) -> None:
        """What each slot's sequence took in this step, for the device drafters (prompt chunks first, then
        the generating slots whose request goes on)."""
        advances = []
        for s, row, chunk in fed:
            nxt = None
            if s.req is not None:
                if s.prefilling:
                    nxt = s.req.prompt[s.prompt_pos]
                elif s.index in emitted:
                    nxt = emitted[s.index][1][0]
            advances.append(Advance(s, s.n_past - len(chunk), row, list(chunk), nxt))
        for s, row, fed_toks, token in advanced:
            if s.req is not None:
                advances.append(Advance(s, s.n_past - len(fed_toks), row, fed_toks, token))
        for d in self.batch_drafters:
            d.after_step(advances, self.slots)

    def _draft_room(self, s: _Slot) -> int:
        """The most drafts slot s can use in its next step: none past the context (the device drafters would
        run positions its sequence does not have - NaN logits, or another sequence's cache) or past
        max_tokens. The slot's draft length is held to it, which is what the device drafters draft."""
        return min(self.runner.n_ctx - s.n_past - 2, s.req.max_tokens - s.n_gen - 1)

    def _eog(self, s: _Slot) -> Collection[int]:
        return () if s.req.ignore_eos else self.runner.tokenizer.eot_ids

    def _emit(self, s: _Slot, token: int, logits, at: int) -> bool:
        """Hand a generated token, which sits at position `at` of the sequence, to the request; False when
        that finished it (the context ends where plain decoding would end it, however many drafts the
        step accepted before the token)."""
        req = s.req
        if s.t_first is None:
            s.t_first = time.perf_counter()
        s.history.append(token)
        s.n_gen += 1
        lp, top_lp = None, None
        if req.n_probs and logits is not None:
            z = logits.astype(np.float64)
            if not np.isfinite(z).all():  # JSON has no NaN: the request cannot be answered
                raise ValueError("the logits of the request's row are NaN or infinite")
            logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            lp = float(logp[token])
            best = np.argsort(-logp, kind="stable")[: req.n_probs]
            top_lp = [(int(i), float(logp[i])) for i in best]
        tok = self.runner.tokenizer
        if tok.is_eog(token) and not req.ignore_eos:
            self._finish(s, "stop", Event("token", "", token, lp, top_lp))
            return False
        text, hit = s.matcher.push(s.decoder.push(token))
        if hit:
            self._finish(s, "stop", Event("token", text, token, lp, top_lp))
            return False
        if s.n_gen >= req.max_tokens or at + 1 >= self.runner.n_ctx:
            tail = s.matcher.push(s.decoder.flush())[0] + s.matcher.flush()
            self._finish(s, "length", Event("token", text + tail, token, lp, top_lp))
            return False
        req.sink(Event("token", text, token, lp, top_lp))
        s.last_token = token
        return True

    def _timings(self, s: _Slot) -> dict:
        t_end = time.perf_counter()
        t_first = s.t_first or t_end
        prompt_n = len(s.req.prompt) - s.reused
        prompt_ms = (t_first - s.t_start) * 1e3
        # the first token comes out of the prompt pass; decode speed counts the steps after it
        predicted_ms = (t_end - t_first) * 1e3
        steps = max(s.n_gen - 1, 0)
        return {
            "cache_n": s.reused,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
            "predicted_n": s.n_gen,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / steps if steps else 0.0,
            "predicted_per_second": steps / predicted_ms * 1e3 if predicted_ms > 0 else 0.0,
            **(s.spec.timings() if s.spec is not None else {"draft_n": 0, "draft_n_accepted": 0}),
        }

    def _finish(self, s: _Slot, reason: str, last: Event) -> None:
        req = s.req
        timings = self._timings(s)
        c = self.counters
        c.requests_total += 1
        c.prompt_tokens_total += timings["prompt_n"]
        c.prompt_seconds_total += timings["prompt_ms"] / 1e3
        c.predicted_tokens_total += timings["predicted_n"]
        c.predicted_seconds_total += timings["predicted_ms"] / 1e3
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": s.n_gen,
                 "total_tokens": len(req.prompt) + s.n_gen}
        s.req = None
        log.info("request %s done in slot %d: %s, %d prompt + %d generated tokens, %.1f tok/s", req.id, s.index,
                 reason, len(req.prompt), s.n_gen, timings["predicted_per_second"],
                 extra={"REQUEST_ID": req.id, "SLOT": s.index, "PROMPT_TOKENS": len(req.prompt),
                        "PREDICTED_TOKENS": s.n_gen})
        req.sink(last)
        req.sink(Event("done", finish_reason=reason, timings=timings, usage=usage))
        with self._cv:
            self._cv.notify_all()

    def _finish_error(self, s: _Slot, err: NextnError) -> None:
        req, s.req = s.req, None
        self.cache.forget(s.index)  # its state may be half-written
        req.sink(Event("error", error=err))
        with self._cv:
            self._cv.notify_all()


def _as_error(e: Exception) -> NextnError:
    """What a request that failed on an unexpected exception is told (the log has the traceback)."""
    return e if isinstance(e, NextnError) else NextnError(f"internal error: {type(e).__name__}: {e}")
