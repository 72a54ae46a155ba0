"""`nextn generate`: one prompt through the scheduler with one slot - the server's decode loop, so the
command line and the server produce the same tokens (and the same speculation) for the same request."""

import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from nextn.sampling import SamplingParams


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_generated: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    stop_reason: str = ""  # "eos", "stop" (a stop string), "length"
    drafted: int = 0
    accepted: int = 0
    tokens: list[int] = field(default_factory=list)


def generate(scheduler, prompt_ids: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
             stop: Sequence[str] = (), ignore_eos: bool = False,
             stats: GenerationStats | None = None) -> Iterator[str]:
    """Yields text pieces as they become final, through a started scheduler. Fills `stats` as it goes."""
    from nextn.scheduler import Request

    stats = stats if stats is not None else GenerationStats()
    tok = scheduler.runner.tokenizer
    events: queue.Queue = queue.Queue()
    req = Request(list(prompt_ids), max_tokens, params or SamplingParams(temperature=0.0), tuple(stop), ignore_eos,
                  sink=events.put)
    scheduler.submit(req)
    try:
        while True:
            ev = events.get()
            if ev.kind == "error":
                raise ev.error
            if ev.kind == "token":
                stats.tokens.append(ev.token)
                if ev.text:
                    yield ev.text
                continue
            t = ev.timings
            stats.n_prompt = ev.usage["prompt_tokens"]
            stats.n_generated = t["predicted_n"]
            stats.prompt_tps, stats.decode_tps = t["prompt_per_second"], t["predicted_per_second"]
            stats.drafted, stats.accepted = t["draft_n"], t["draft_n_accepted"]
            eos = ev.finish_reason == "stop" and stats.tokens and tok.is_eog(stats.tokens[-1]) and not ignore_eos
            stats.stop_reason = "eos" if eos else ev.finish_reason
            return
    finally:
        scheduler.cancel(req)  # a consumer that stops early (broken pipe) frees the slot
