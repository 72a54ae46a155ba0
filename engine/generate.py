"""Text generation on one sequence: prompt, then one token per step until a stop condition.

Greedy steps read back only the device's argmax; sampled steps read the final logits row. Stop strings
are matched on the decoded text; text that may be the start of a stop string is held back until it is
known not to be one, so a stop string never reaches the caller.
"""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from nextn.sampling import Sampler, SamplingParams


class StopMatcher:
    """Feeds decoded text through; returns what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_generated: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "stop", "length"
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prompt pass; decode speed counts the steps after it
        steps = max(self.n_generated - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def generate(
    runner,
    prompt_ids: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop: Sequence[str] = (),
    seq: int = 0,
    stats: GenerationStats | None = None,
    ignore_eos: bool = False,
) -> Iterator[str]:
    """Yields text pieces as they become final. Fills `stats` (tokens, timings, stop reason) as it goes."""
    params = params or SamplingParams(temperature=0.0)
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params)
    greedy = params.temperature <= 0
    tok = runner.tokenizer
    decoder = tok.stream_decoder()
    matcher = StopMatcher(stop)
    history = list(prompt_ids)
    n_ctx_left = runner.n_ctx - len(prompt_ids)
    max_tokens = min(max_tokens, n_ctx_left)

    t0 = time.perf_counter()
    top, logits = runner.eval(seq, prompt_ids, 0, want_logits=not greedy)
    stats.n_prompt = len(prompt_ids)
    stats.prompt_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pos = len(prompt_ids)
    stats.stop_reason = "length"
    for i in range(max_tokens):
        token = int(top[-1]) if greedy else sampler.sample(logits[-1], history)
        history.append(token)
        stats.tokens.append(token)
        stats.n_generated += 1
        if tok.is_eog(token) and not ignore_eos:
            stats.stop_reason = "eos"
            break
        text, hit = matcher.push(decoder.push(token))
        if text:
            yield text
        if hit:
            stats.stop_reason = "stop"
            break
        if i + 1 == max_tokens:
            break
        top, logits = runner.eval(seq, [token], pos, want_logits=not greedy)
        pos += 1
    stats.decode_seconds = time.perf_counter() - t1
    if stats.stop_reason != "stop":
        tail = matcher.push(decoder.flush())[0] + matcher.flush()
        if tail:
            yield tail
