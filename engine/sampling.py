"""Host-side samplers: penalties, top-k, top-p, min-p, temperature, then a seeded draw.

The order is llama.cpp's default chain (penalties -> top_k -> top_p -> min_p -> temperature -> dist).
`probs()` returns the final distribution over the whole vocabulary, which exact speculative verification
(rejection sampling) needs; `sample()` draws from it. Work is done on a candidate subset (the top_k largest
logits found with argpartition) so a 150k vocabulary costs well under a millisecond.
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from nextn.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; defaults are llama-server's."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: whole vocabulary
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # -1: whole history, 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1: a random seed

    def __post_init__(self):
        # types first, so the range checks below compare numbers
        for f in fields(self):
            want = int if f.type in (int, "int") else float
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not float(v).is_integer()):
                raise RequestError(f"invalid type for {f.name}: {v!r} (expected a {want.__name__})")
        checks = {
            "temperature": self.temperature >= 0 and np.isfinite(self.temperature),
            "top_p": 0.0 <= self.top_p <= 1.0,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "repeat_penalty": self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty),
            "repeat_last_n": self.repeat_last_n >= -1,
            "presence_penalty": np.isfinite(self.presence_penalty),
            "frequency_penalty": np.isfinite(self.frequency_penalty),
            "seed": self.seed >= -1,
        }
        for name, ok in checks.items():
            if not ok:
                raise RequestError(f"invalid value for {name}: {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed < 0 else params.seed)

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        if p.repeat_last_n == 0 or not len(history) or (
            p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
        ):
            return logits
        recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
        ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        keep = ids < logits.shape[0]
        ids, counts = ids[keep], counts[keep]
        out = np.array(logits, dtype=np.float32, copy=True)
        v = out[ids]
        # llama.cpp: divide positive logits by the penalty, multiply negative ones
        v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        v -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
        out[ids] = v
        return out

    def candidates(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that survive the filters, probabilities summing to 1."""
        p = self.params
        logits = self.penalized(np.asarray(logits, dtype=np.float32), history)
        n = logits.shape[0]
        if p.greedy:
            return np.array([int(np.argmax(logits))]), np.array([1.0])
        if 0 < p.top_k < n:
            ids = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        else:
            ids = np.arange(n)
        # sort descending by logit; ties by id so the result is deterministic
        order = np.lexsort((ids, -logits[ids]))
        ids = ids[order]
        z = logits[ids].astype(np.float64)
        # top-p and min-p act on the distribution before temperature, as llama.cpp's default chain does
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, z, probs = ids[:cut], z[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, z = ids[keep], z[keep]
        z = z / p.temperature
        probs = np.exp(z - z.max())
        return ids, probs / probs.sum()

    def probs(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The final distribution over the whole vocabulary."""
        ids, pr = self.candidates(logits, history)
        out = np.zeros(np.asarray(logits).shape[0], np.float64)
        out[ids] = pr
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, pr = self.candidates(logits, history)
        if len(ids) == 1:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=pr)])
