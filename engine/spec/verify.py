"""Verification of speculative drafts: how many drafted tokens the target accepts, and the token that follows.

A drafter proposes d_1..d_N for a slot; the target runs once over [last, d_1..d_N] and returns N+1 rows of
logits, row i being its distribution for the token after d_i (row 0: after `last`). A verifier returns
(n_accepted, next_token) and the slot emits drafts[:n_accepted] + [next_token], so every step emits at least
one token and at most N+1 (llama.cpp common/sampling.cpp `common_sampler_sample_and_accept_n`).

- `verify_greedy`: temperature <= 0 and the target's choices already known (argmax on the device): accept
  while the draft equals the target's choice. Output is token-identical to decoding without speculation.
- `verify_sampled`: the full sampler chain (penalties, top-k/top-p/min-p, temperature) on the host and exact
  speculative sampling (Leviathan et al. 2023, Chen et al. 2023; llama.cpp
  `common_sampler_sample_and_accept_n_rejection`): accept d_i with probability min(1, p_i(d_i) / q_i(d_i)),
  on the first rejection draw from normalize(max(0, p_i - q_i)) and stop, after N acceptances draw the bonus
  token from p_N. Whatever q is, each emitted token is distributed exactly as the plain sampler's draw.
- `SynthAcceptance`: llama.cpp's --spec-synth-rates / --spec-synth-len. It decides acceptance at random to
  benchmark the speculation machinery; the text it produces is NOT the model's output.

End of generation: a draft token that is an end-of-generation token (`eog`) ends the step when accepted: it
is returned as next_token with nothing after it, as llama.cpp does, so the slot never keeps drafted tokens
past the end in its context and no bonus token is drawn after the end.
"""

import logging
import math
from collections.abc import Collection, Sequence

import numpy as np

from nextn import config
from nextn.errors import ConfigError
from nextn.sampling import Sampler

log = logging.getLogger(__name__)


def verify_greedy(
    drafts: Sequence[int], target_top: Sequence[int], eog: Collection[int] = ()
) -> tuple[int, int]:
    """(n_accepted, next_token) for greedy decoding: drafts are accepted while drafts[i] == target_top[i];
    next_token = target_top[n_accepted] (an accepted end-of-generation draft is returned as next_token
    instead, ending the step).

    target_top[i] must be the target's greedy choice for row i *including repetition penalties*: a device
    argmax of the raw logits is only right when the request has no penalties - otherwise call
    verify_sampled, which applies the whole chain on the host.
    """
    n = len(drafts)
    if len(target_top) < n + 1:
        raise ValueError(f"{n} drafts need {n + 1} target rows, got {len(target_top)}")
    for i in range(n):
        d = int(drafts[i])
        if d != int(target_top[i]):
            break
        if d in eog:
            return i, d
    else:
        i = n
    return i, int(target_top[i])


def verify_sampled(
    drafts: Sequence[int],
    draft_probs: Sequence[np.ndarray | None] | None,
    target_logits: Sequence[np.ndarray] | np.ndarray,
    sampler: Sampler,
    history: Sequence[int],
    eog: Collection[int] = (),
) -> tuple[int, int]:
    """(n_accepted, next_token) by exact speculative sampling with the request's sampler.

    drafts: d_1..d_N. draft_probs[i]: the drafter's full distribution q_i over the vocabulary from which
    d_i was *sampled* (an ndarray), or None for a point proposal - an n-gram match or a greedy drafter, whose
    q_i is a unit mass on d_i (draft_probs=None: all point proposals). A q_i that is not the distribution the
    draft was drawn from breaks exactness (for example the top-k-truncated list of a drafter that then took
    its argmax: pass None for that one).
    target_logits: N+1 rows (an [N+1, n_vocab] array or a list of rows). history: the tokens before `last`
    and `last` itself (prompt and generated), which the penalties look at; row i is penalized with
    history + drafts[:i], as if the drafts before it had been accepted - the only case in which row i is used.

    Every random draw comes from sampler.rng, so a seeded request reproduces. Rows are turned into
    probabilities lazily, one per draft judged: a rejection at d_1 costs one row, not N+1. Greedy params
    (temperature <= 0) accept by match against the penalized argmax, which is exact for greedy decoding.
    """
    n = len(drafts)
    if len(target_logits) < n + 1:
        raise ValueError(f"{n} drafts need {n + 1} target rows, got {len(target_logits)}")
    if draft_probs is not None and len(draft_probs) != n:
        raise ValueError(f"{n} drafts need {n} draft distributions (or None), got {len(draft_probs)}")
    p = sampler.params
    # penalties look at most at the last repeat_last_n tokens: slice once instead of copying a long history
    # per row; without penalties the sampler ignores history entirely
    if not p.penalizes:
        base: list[int] = []
    elif p.repeat_last_n > 0:
        base = [int(t) for t in history[-p.repeat_last_n :]]
    else:
        base = [int(t) for t in history]

    def hist(i: int) -> list[int]:
        return base + [int(t) for t in drafts[:i]] if p.penalizes else base

    if p.greedy:
        for i in range(n):
            top = int(sampler.candidates(target_logits[i], hist(i))[0][0])
            d = int(drafts[i])
            if d != top:
                return i, top
            if d in eog:
                return i, d
        return n, int(sampler.candidates(target_logits[n], hist(n))[0][0])

    rng = sampler.rng
    for i in range(n):
        d = int(drafts[i])
        ids, pr = _target(sampler, target_logits[i], hist(i))
        if ids is None:
            at = d
        else:
            hit = np.flatnonzero(ids == d)
            at = int(hit[0]) if len(hit) else -1
        p_d = float(pr[at]) if 0 <= at < len(pr) else 0.0
        q = None if draft_probs is None else draft_probs[i]
        q_d = 1.0 if q is None else float(q[d])
        if not q_d > 0.0:
            raise ValueError(
                f"draft {i} (token {d}) has probability {q_d} under its draft distribution: "
                "q must be the distribution the draft was sampled from"
            )
        # accept with probability min(1, p/q); p >= q always accepts (u < 1)
        if rng.random() * q_d < p_d:
            if d in eog:
                return i, d
            continue
        # rejected: draw from max(0, p - q), which lives inside p's support
        if q is None:
            resid = pr.copy()
            if 0 <= at < len(resid):
                resid[at] = 0.0
        else:
            qs = q if ids is None else q[ids]
            resid = np.maximum(pr - np.asarray(qs, dtype=pr.dtype), 0.0)
        if not resid.sum(dtype=np.float64) > 0.0:
            # p <= q everywhere, so p == q up to rounding and a rejection had probability ~0: p is the limit
            # of the residual (llama.cpp keeps the target's own draw here too)
            resid = pr
        return i, _draw(rng, ids, resid)
    ids, pr = _target(sampler, target_logits[n], hist(n))
    return n, _draw(rng, ids, pr)


def _target(sampler: Sampler, logits: np.ndarray, history: list[int]) -> tuple[np.ndarray | None, np.ndarray]:
    """The target distribution of one row as (ids, probabilities); ids None: probabilities over the whole
    vocabulary, indexed by token.

    Without a truncating filter (top-k off, top-p 1, min-p 0) every token survives and the sampler would sort
    the whole vocabulary (~4 ms for 152k tokens) only to list it; the softmax alone is the same distribution
    and costs ~0.2 ms, in float32 with a float64 normalizer.
    """
    p = sampler.params
    z = np.asarray(logits)
    scale = 1.0 / p.temperature
    # a truncating filter, or a temperature so near 0 that 1/T is no float32 (0 * inf would be NaN): the
    # sampler's own float64 chain
    if (0 < p.top_k < z.shape[-1]) or p.top_p < 1.0 or p.min_p > 0.0 or not scale <= config.FLOAT32_MAX:
        return sampler.candidates(z, history)
    z = sampler.penalized(z, history)
    z_max = float(z.max()) if z.ndim == 1 and z.shape[0] else math.nan
    if not -math.inf < z_max < math.inf:  # NaN, +inf, all -inf or empty: the sampler's own check and message
        return sampler.candidates(z, ())
    with np.errstate(over="ignore"):  # saturated logits 2 * 3.4e38 apart: exp(-inf) = 0, as it should
        e = np.exp((z.astype(np.float32, copy=False) - np.float32(z_max)) * np.float32(scale))
    return None, e / np.float32(e.sum(dtype=np.float64))


def _draw(rng: np.random.Generator, ids: np.ndarray | None, weights: np.ndarray) -> int:
    """One token drawn in proportion to weights (need not sum to 1) over ids (None: over token ids)."""
    if len(weights) == 1:
        return int(ids[0]) if ids is not None else 0
    cum = np.cumsum(weights, dtype=np.float64)
    j = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(weights) - 1)
    return int(ids[j]) if ids is not None else j


# ------------------------------------------------------------------------------- synthetic acceptance


def synth_rates(n_max: int, rates: Sequence[float] | None = None, length: float | None = None) -> list[float]:
    """The unconditional per-position acceptance rates R_0..R_{n_max-1} (R_i: probability that draft i+1 is
    accepted, i.e. that at least i+1 drafts are), from exactly one of

    - rates: --spec-synth-rates P0,P1,...: n_max values in [0, 1], non-increasing;
    - length: --spec-synth-len L: the mean number of tokens a step emits, the target's own token included,
      in [1, n_max + 1]; resolved to geometric rates p, p^2, ..., p^n_max with 1 + sum = L (p by bisection).

    Same rules and errors as llama.cpp common/speculative.cpp `common_speculative_synth_rates_resolve`.
    """
    if rates is not None and length is not None:
        raise ConfigError("--spec-synth-rates and --spec-synth-len are mutually exclusive")
    if rates is None and length is None:
        raise ConfigError("synthetic acceptance needs --spec-synth-rates or --spec-synth-len")
    if n_max <= 0:
        raise ConfigError("synthetic acceptance requires at least one speculative token (--spec-draft-n-max)")
    if rates is not None:
        rates = [float(r) for r in rates]
        if len(rates) != n_max:
            raise ConfigError(
                f"--spec-synth-rates must contain {n_max} values (the draft n_max), got {len(rates)}"
            )
        for i, r in enumerate(rates):
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise ConfigError(f"--spec-synth-rates: value {i} ({r}) must be finite and within [0, 1]")
            if i > 0 and r > rates[i - 1]:
                raise ConfigError("--spec-synth-rates must be non-increasing (unconditional rates)")
        return rates
    length = float(length)
    if not (math.isfinite(length) and 1.0 <= length <= n_max + 1.0):
        raise ConfigError(f"--spec-synth-len must be finite and within [1, {n_max + 1}], got {length}")
    if length == n_max + 1.0:
        p = 1.0
    elif length == 1.0:
        p = 0.0
    else:
        lo, hi = 0.0, 1.0
        for _ in range(64):  # sum_{j=1..n} p^j grows with p: bisect to float precision
            mid = 0.5 * (lo + hi)
            if sum(mid**j for j in range(1, n_max + 1)) < length - 1.0:
                lo = mid
            else:
                hi = mid
        p = 0.5 * (lo + hi)
    return [p ** (j + 1) for j in range(n_max)]


_warned: set[tuple[float, ...]] = set()


class SynthAcceptance:
    """SYNTHETIC acceptance for benchmarking - THE OUTPUT IS NOT VALID MODEL OUTPUT.

    llama-server's --spec-synth-rates / --spec-synth-len (tools/server/server-context.cpp
    `server_sample_and_accept_synth`): draft i is accepted with the conditional probability
    R_i / R_{i-1} (R_{-1} = 1) instead of by comparison with the target, so a benchmark can fix the
    acceptance profile and measure what the rest of the machinery (batched verify, rollback, drafting) does
    with it. An accepted draft is emitted even when the target would never have produced it; at the first
    rejection the target's own sampled token is emitted. An accepted end-of-generation draft is rejected
    instead (as llama.cpp does), so a random accept does not end the generation early.

    The draws use this object's numpy generator (seed -1: random), not the request sampler's, so the
    synthetic decisions do not disturb the sampler's stream; llama.cpp uses a per-slot mt19937, so the
    decisions match its statistics, not its exact sequence.
    """

    def __init__(
        self, n_max: int, rates: Sequence[float] | None = None, length: float | None = None, seed: int = -1
    ):
        self.rates = tuple(synth_rates(n_max, rates, length))
        probs, prev = [], 1.0
        for r in self.rates:
            probs.append(r / prev if prev > 0.0 else 0.0)
            prev = r
        self.probs = tuple(probs)  # conditional: P(accept draft i | drafts before it accepted)
        self.rng = np.random.default_rng(None if seed < 0 else seed)
        # one object per slot and request: say it once per configuration, not once per request
        if self.rates in _warned:
            return
        _warned.add(self.rates)
        log.warning(
            "synthetic speculative acceptance is enabled for benchmarking; generated output is NOT valid "
            "(n_max=%d, mean length %.4f, rates [%s])",
            n_max,
            self.mean_length,
            ", ".join(f"{r:.6g}" for r in self.rates),
        )

    @property
    def n_max(self) -> int:
        return len(self.rates)

    @property
    def mean_length(self) -> float:
        """Mean tokens emitted per step when every step drafts n_max tokens: 1 + sum of the rates."""
        return 1.0 + sum(self.rates)

    def n_accepted(self, drafts: Sequence[int], eog: Collection[int] = ()) -> int:
        """How many of the drafts to accept (a prefix), decided at random. NOT valid model output."""
        if len(drafts) > len(self.probs):
            raise ValueError(f"{len(drafts)} drafts but synthetic rates for only {len(self.probs)}")
        for i, d in enumerate(drafts):
            if not self.rng.random() < self.probs[i] or int(d) in eog:
                return i
        return len(drafts)

    def verify(
        self,
        drafts: Sequence[int],
        target_logits: Sequence[np.ndarray] | np.ndarray,
        sampler: Sampler,
        history: Sequence[int],
        eog: Collection[int] = (),
    ) -> tuple[int, int]:
        """(n_accepted, next_token) like verify_sampled, with synthetic acceptance; next_token is the target's
        own draw (the request's sampler, penalties seeing the accepted drafts) at the first rejected row.
        NOT valid model output."""
        if len(target_logits) < len(drafts) + 1:
            raise ValueError(
                f"{len(drafts)} drafts need {len(drafts) + 1} target rows, got {len(target_logits)}"
            )
        n = self.n_accepted(drafts, eog)
        hist = list(history) + [int(t) for t in drafts[:n]] if sampler.params.penalizes else ()
        return n, sampler.sample(target_logits[n], hist)
