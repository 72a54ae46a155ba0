"""Host-side samplers: repetition penalties, top-k, top-p, min-p, temperature, then a seeded draw.

The filters run in llama.cpp's default chain order (common/common.h `samplers`; the ones nextn has):

    penalties -> top_k -> top_p -> min_p -> temperature -> dist

with llama.cpp's semantics (src/llama-sampler.cpp): top-p and min-p look at the distribution *before*
temperature (temperature is applied last), top-p keeps the smallest prefix of the sorted candidates whose
probability reaches p (at least one token), min-p keeps tokens whose probability is at least min_p times
the top one (logit >= max + ln(min_p)), and a temperature <= 0 is greedy: the argmax of the penalized
logits.

`probs()` returns that final distribution over the whole vocabulary - what exact speculative verification
(accept with min(1, p/q), resample from max(0, p - q)) needs - and `sample()` draws from it with the
sampler's own numpy Generator, so a seed reproduces a run.

Extreme values: the penalties run in float32 as llama.cpp's, and a penalty at the end of its range (a
presence penalty of -3e38, a repeat penalty of 1e-45 dividing a logit) would overflow to inf, and inf - inf
to NaN. They saturate at the largest finite float32 instead, so the filters always see finite logits (banned
tokens alone are -inf) and every distribution is a real one.

Speed: a 150k vocabulary would cost ~0.3 ms for a full argpartition and several for a sort. Instead the
top-k set is bracketed from a strided sample (one vectorised compare over the vocabulary keeps a few
hundred logits) and only the survivors are partitioned and sorted; see _top_k and _head.
"""

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

import numpy as np

from nextn import config
from nextn.errors import RequestError

# without top-k or min-p, top-p needs the sorted head of the vocabulary holding mass top_p: windows this
# many nats below the max logit are tried in turn before the whole vocabulary
_WINDOWS = (8.0, 16.0, 32.0, 64.0)

_F32_MAX = np.float32(config.FLOAT32_MAX)
_BEYOND_FLOAT32 = "is beyond the range of a 32-bit float"
# the fields that are also [sampling] settings keep the settings' bounds per request (engine/config.py)
_SETTINGS = {k.split(".")[1] for k, _ in config.iter_fields() if k.startswith("sampling.")}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. Defaults are llama-server's; names follow its request fields."""

    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off (whole vocabulary)
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # -1: the whole history, 0: penalties off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1: a random seed

    def __post_init__(self):
        # JSON numbers: accept 40.0 for an int field, reject bools, strings, NaN and infinities
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = f.type in (int, "int")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f"invalid {f.name}: {v!r} is not a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise RequestError(f"invalid {f.name}: {v!r} is not finite")
            if want_int:
                if isinstance(v, float) and not v.is_integer():
                    raise RequestError(f"invalid {f.name}: {v!r} is not an integer")
                object.__setattr__(self, f.name, int(v))
            else:
                try:
                    object.__setattr__(self, f.name, float(v))
                except OverflowError:  # an integer of hundreds of digits
                    raise RequestError(f"invalid {f.name}: {v!r} {_BEYOND_FLOAT32}") from None
            if f.name in _SETTINGS:  # a request cannot ask for what the flag refuses
                config.check_request(f"sampling.{f.name}", getattr(self, f.name), f.name)
        rules = (
            # the penalty divides logits as a float32: a value that is 0 there divides by zero
            ("repeat_penalty", np.float32(self.repeat_penalty) > 0, "must be greater than 0 (as a 32-bit float)"),
            ("repeat_last_n", self.repeat_last_n >= -1, "must be -1 (whole history), 0 (off) or positive"),
            # no setting of their own: llama-server's range, a float32
            ("presence_penalty", abs(self.presence_penalty) <= config.FLOAT32_MAX, _BEYOND_FLOAT32),
            ("frequency_penalty", abs(self.frequency_penalty) <= config.FLOAT32_MAX, _BEYOND_FLOAT32),
        )
        for name, ok, why in rules:
            if not ok:
                raise RequestError(f"invalid {name}: {getattr(self, name)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalizes(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


class Sampler:
    """Turns logits into a token for one sequence. Keeps only its random generator as state; the caller
    passes the token history (prompt and generated tokens) that the penalties look at.

    banned: tokens whose logit is -inf before anything else (llama.cpp's logit bias, first in its chain):
    llama-server bans the end-of-generation tokens of an `ignore_eos` request this way, so the text goes
    on as the model would write it rather than past an end token it sampled."""

    def __init__(self, params: SamplingParams, banned: Collection[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed < 0 else params.seed)
        self.banned = np.asarray(sorted(banned), dtype=np.int64)

    @property
    def needs_logits(self) -> bool:
        """Whether the choice needs the logits on the host (else the device argmax is the token)."""
        return not self.params.greedy or self.params.penalizes or self.banned.size > 0

    # ----------------------------------------------------------------------------------------- filters

    def penalized(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """Logits after the repetition penalties (a copy when any applies; the input is never changed).

        For each token seen c > 0 times in the last repeat_last_n of history (llama.cpp's penalties sampler):
        logit = logit / repeat_penalty if logit > 0 else logit * repeat_penalty, then
        logit -= c * frequency_penalty + presence_penalty.
        """
        p = self.params
        logits = np.asarray(logits)
        out = None
        if p.penalizes and len(history):
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
            keep = (ids >= 0) & (ids < logits.shape[0])
            ids, counts = ids[keep], counts[keep]
            out = np.array(logits, dtype=np.float32, copy=True)
            v = out[ids]
            rp = np.float32(p.repeat_penalty)
            with np.errstate(over="ignore"):  # saturated below: the sampler needs finite logits
                v = np.clip(np.where(v <= 0, v * rp, v / rp), -_F32_MAX, _F32_MAX)
                pen = np.clip(counts * p.frequency_penalty + p.presence_penalty, -_F32_MAX, _F32_MAX)
                v = v - pen.astype(np.float32)
            out[ids] = np.clip(v, -_F32_MAX, _F32_MAX)
        if self.banned.size:  # after the penalties (equal to llama.cpp's bias first: -inf stays -inf there)
            out = np.array(logits, dtype=np.float32, copy=True) if out is None else out
            out[self.banned[self.banned < out.shape[0]]] = -np.inf
        return logits if out is None else out

    def candidates(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) of the final distribution: ids by falling probability, probabilities
        summing to 1."""
        p = self.params
        z = self.penalized(logits, history)
        if z.ndim != 1 or z.shape[0] == 0:
            raise ValueError(f"logits must be a non-empty vector, got shape {z.shape}")
        top = int(np.argmax(z))
        z_max = float(z[top])
        if not -math.inf < z_max < math.inf:  # NaN (argmax stops at the first NaN), +inf, or every logit -inf
            raise ValueError("logits are NaN, infinite or all -inf")
        if p.greedy:
            return np.array([top], dtype=np.int64), np.ones(1)

        n = z.shape[0]
        if 0 < p.top_k < n:
            ids = self._top_k(z, z_max, p.top_k)
            e = np.exp(z[ids].astype(np.float64) - z_max)
            total = float(e.sum())  # top-p normalizes over the top-k set
        else:
            ids, e, total = self._head(z, z_max)

        if p.top_p < 1.0:
            cum = np.cumsum(e) / total
            cut = int(np.searchsorted(cum, p.top_p, side="left")) + 1  # shortest prefix with mass >= top_p
            ids, e = ids[:cut], e[:cut]
        if p.min_p > 0.0:
            keep = z[ids] >= np.float32(z_max + math.log(p.min_p))  # p_i >= min_p * p_max, on logits
            ids = ids[keep]

        zi = z[ids].astype(np.float64)
        with np.errstate(over="ignore"):  # a temperature near 0: -inf for all but the top, as it should
            e = np.exp((zi - z_max) / p.temperature)
        keep = e > 0  # -inf logits (masked tokens) carry no probability
        ids, e = ids[keep], e[keep]
        return ids, e / e.sum()

    @staticmethod
    def _sorted(z: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """ids ordered by falling logit. Ties keep an order fixed by the input (numpy's introsort has no
        randomness), so a seed still reproduces; a stable sort would cost ~6x more on a 100k-token head."""
        return ids[np.argsort(-z[ids])]

    def _top_k(self, z: np.ndarray, z_max: float, k: int) -> np.ndarray:
        """Ids of the k largest logits, sorted.

        A full argpartition of 150k logits costs ~0.3 ms, so the k-th largest is first bracketed from a
        strided sample of ~4096 logits: the j-th largest of the sample has about j*stride logits above it in
        the whole vocabulary, and j is chosen for about 2k + 8*stride of them. One compare pass then keeps
        only those, and the partition runs on a few hundred. If the sample misjudged (fewer than k
        above), the whole vocabulary is partitioned instead: the result is exact either way.
        """
        n = z.shape[0]
        stride = max(1, n // 4096)
        ids = None
        if stride > 1:
            sample = z[::stride]
            j = min(len(sample), -(-2 * k // stride) + 8)
            cut = np.partition(sample, len(sample) - j)[len(sample) - j]
            ids = np.flatnonzero(z >= cut)
            if len(ids) < k:
                ids = None
        if ids is None:
            ids = np.arange(n)
        if len(ids) > k:
            ids = ids[np.argpartition(-z[ids], k - 1)[:k]]
        return self._sorted(z, ids)

    def _head(self, z: np.ndarray, z_max: float) -> tuple[np.ndarray, np.ndarray, float]:
        """Without top-k: the sorted ids the later filters can need, their exp(z - max), and the softmax
        normalizer over the whole vocabulary (top-p needs it).

        With min-p the survivors are the tokens with logit >= max + ln(min_p): nothing below can be needed,
        whatever top-p does. With top-p alone, windows below the max are widened until they hold mass
        top_p (the cut falls inside). With neither filter every token survives.
        """
        p = self.params
        total = 1.0
        if p.top_p < 1.0:
            total = float(np.exp(z - np.float32(z_max), dtype=np.float32).sum(dtype=np.float64))
        if p.min_p > 0.0:
            ids = np.flatnonzero(z >= np.float32(z_max + math.log(p.min_p)))
        elif p.top_p < 1.0:
            for width in (*_WINDOWS, math.inf):
                ids = np.flatnonzero(z >= z_max - width) if width < math.inf else np.arange(z.shape[0])
                if np.exp(z[ids].astype(np.float64) - z_max).sum() >= p.top_p * total:
                    break
        else:
            ids = np.arange(z.shape[0])
        ids = self._sorted(z, ids)
        return ids, np.exp(z[ids].astype(np.float64) - z_max), total

    # ------------------------------------------------------------------------------------------ public

    def probs(self, logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
        """The final distribution over the whole vocabulary (float64, sums to 1)."""
        ids, pr = self.candidates(logits, history)
        out = np.zeros(np.asarray(logits).shape[0], dtype=np.float64)
        out[ids] = pr
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """One token drawn from probs() with this sampler's generator (greedy: the argmax, no draw)."""
        ids, pr = self.candidates(logits, history)
        if len(ids) == 1:
            return int(ids[0])
        cum = np.cumsum(pr)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])
