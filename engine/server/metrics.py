"""/metrics in the Prometheus text format (0.0.4), written by hand: a dozen series do not need a library.

Names are nextn_*; docs/serving.md maps each to the llama-server `llamacpp:` series it corresponds to.
"""

from __future__ import annotations

# (name, type, help, value getter on (counters, scheduler))
_SERIES = [
    ("nextn_requests_total", "counter", "Requests finished", lambda c, s: c.requests_total),
    ("nextn_requests_cancelled_total", "counter", "Requests cancelled (client gone)", lambda c, s: c.requests_cancelled),
    ("nextn_requests_rejected_total", "counter", "Requests refused (queue full or too long)", lambda c, s: c.requests_rejected),
    ("nextn_prompt_tokens_total", "counter", "Prompt tokens processed", lambda c, s: c.prompt_tokens_total),
    ("nextn_prompt_seconds_total", "counter", "Prompt processing time", lambda c, s: c.prompt_seconds_total),
    ("nextn_prompt_cache_tokens_total", "counter", "Prompt tokens reused from the prompt cache",
     lambda c, s: c.prompt_cache_tokens_total),
    ("nextn_predicted_tokens_total", "counter", "Generated tokens", lambda c, s: c.predicted_tokens_total),
    ("nextn_predicted_seconds_total", "counter", "Generation time", lambda c, s: c.predicted_seconds_total),
    ("nextn_prompt_tokens_per_second", "gauge", "Average prompt throughput",
     lambda c, s: c.prompt_tokens_total / c.prompt_seconds_total if c.prompt_seconds_total else 0.0),
    ("nextn_predicted_tokens_per_second", "gauge", "Average generation throughput",
     lambda c, s: c.predicted_tokens_total / c.predicted_seconds_total if c.predicted_seconds_total else 0.0),
    ("nextn_queue_depth", "gauge", "Requests waiting for a slot", lambda c, s: s.queue_depth()),
    ("nextn_slots_busy", "gauge", "Slots generating", lambda c, s: s.busy_slots()),
    ("nextn_slots_total", "gauge", "Slots configured (--parallel)", lambda c, s: s.n_slots),
    ("nextn_steps_total", "counter", "Model steps (batches) run", lambda c, s: c.steps_total),
    ("nextn_step_tokens_total", "counter", "Tokens evaluated in all steps", lambda c, s: c.step_tokens_total),
    ("nextn_tokens_drafted_total", "counter", "Draft tokens proposed by speculation", lambda c, s: c.drafted_tokens_total),
    ("nextn_tokens_drafted_accepted_total", "counter", "Draft tokens accepted", lambda c, s: c.drafted_accepted_total),
]

NAMES = [name for name, *_ in _SERIES]


def render(scheduler) -> str:
    c = scheduler.counters
    lines = []
    for name, kind, help_text, get in _SERIES:
        v = get(c, scheduler)
        # exact: counts as integers, times and rates with every digit (":g" printed 1.02e+06 for 1019871)
        text = str(v) if isinstance(v, int) else repr(float(v))
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {text}"]
    return "\n".join(lines) + "\n"
