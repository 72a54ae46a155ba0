"""Adaptive draft length: how many tokens a slot should draft next, from measured acceptance and step cost.

llama.cpp drafts a fixed --spec-draft-n-max (default 3) tokens per step, and users report that this often
makes decoding slower: when drafts are mostly rejected, or when a step over k+1 tokens costs much more than
a step over one (a compute-bound CPU, a big batch), speculation loses. The break-even depends on both the
text and the machine, so it is measured instead of configured.

The model. With a_j the probability that draft j is accepted given that the drafts before it were (estimated
per position from the verifier's results), a step that drafts k tokens emits on average

    E_k = 1 + a_0 + a_0 a_1 + ... + a_0 ... a_{k-1}      (the verifier always emits one token of its own)

and takes C_k = step(n_other + k + 1) + draft(k) seconds, step() being the measured wall time of a target
step by the number of tokens in it (StepCost, shared by the slots of one model), n_other the tokens the other
slots put in the same step, and draft(k) the drafter's time: k times its cost per token for a draft model,
but for the MTP block a pass over the step's tokens that runs at every step whatever k is (its KV must hold
every position) and yields the first draft, plus k - 1 further steps of the block. That pass is paid at
k = 0 too: counting it only against drafting made the controller fall back to plain decoding that was
slower than drafting one token. AdaptiveDraft.choose() returns the k in {0} u [max(1, n_min), n_max]
that maximizes the step's useful tokens per second, (n_other + E_k) / C_k - alone, the slot's own rate
E_k / C_k; in a full batch, the other slots' tokens count too, so a slot does not speed itself up by slowing
everyone else down more. k = 0 is a plain decode step. A slot that always drafts takes a plain step now and
then while the 1-token cost is unmeasured: it often runs other kernels (mat-vec) and cannot be extrapolated.

Falling back to 0 stops the flow of acceptance data, and the text may change (prose to code), so after a
fallback the controller probes - drafts a few tokens - after probe_every steps, doubling the wait after each
probe that does not bring speculation back (up to probe_max), and it forgets old acceptance counts while it
waits, so a probe is not outvoted by a long-gone past.

p_min is the confidence a drafter should require of a token before drafting it (llama.cpp's
--spec-draft-p-min: drafting stops at the first token whose top probability is below it). It is the
break-even acceptance of one drafted token at the chosen operating point: adding a token that costs dC seconds
and is accepted with probability p raises the rate R = (n_other + E_k) / C_k iff p / dC > R, so
p_min = R * dC, with dC the mean cost of a drafted position at the chosen k (at k = 0: of the first one). It follows acceptance: when drafts are mostly
accepted the rate is high and a doubtful token is not worth its slot; when they are not, the rate is near
plain decoding and any token more likely than its relative cost is worth drafting.
"""

import bisect
import math
from collections import deque


class StepCost:
    """Wall time of target steps by the number of tokens in them, measured; shared by the slots of a model.

    Each batch size keeps the median of its last `window` observations: the cores are shared, and one step
    slowed by another process must not move the estimate (a mean would). Sizes never measured are
    interpolated linearly between measured neighbours and extrapolated with the least-squares slope of the
    measured multi-token sizes (before two are measured: prior_slope times the measured cost per token, a
    mildly optimistic guess, so that longer drafts get tried and measured at all).
    """

    def __init__(self, window: int = 16, prior_slope: float = 0.1):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.prior_slope = prior_slope
        self._obs: dict[int, deque] = {}
        self._median: dict[int, float] = {}
        self._sizes: list[int] = []  # measured sizes, ascending
        self._draft: deque = deque(maxlen=window)
        self._draft_median = 0.0
        self._pass: deque = deque(maxlen=window)
        self._pass_median = 0.0
        self._slopes: dict[bool, float] = {}  # cached _slope(multi-token sizes only?), cleared on observe

    def observe(self, n_tokens: int, seconds: float) -> None:
        """Record one target step over n_tokens tokens (all slots) that took `seconds`."""
        if n_tokens < 1 or not (seconds >= 0.0 and math.isfinite(seconds)):
            return  # an empty step or a clock glitch carries no information
        obs = self._obs.get(n_tokens)
        if obs is None:
            obs = self._obs[n_tokens] = deque(maxlen=self.window)
            bisect.insort(self._sizes, n_tokens)
        obs.append(seconds)
        self._median[n_tokens] = _median(obs)
        self._slopes.clear()

    def observe_draft(self, n_drafted: int, seconds: float) -> None:
        """Record the drafter's time for n_drafted tokens drafted one step at a time (a draft model's; the MTP
        block's drafts after the first; an n-gram lookup costs ~nothing and need not be reported)."""
        if n_drafted < 1 or not (seconds >= 0.0 and math.isfinite(seconds)):
            return
        self._draft.append(seconds / n_drafted)
        self._draft_median = _median(self._draft)

    def observe_draft_pass(self, seconds: float) -> None:
        """Record the drafter's pass that runs at every step whatever the draft length and yields each drafting
        slot's first draft (the MTP block over the step's tokens)."""
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            return
        self._pass.append(seconds)
        self._pass_median = _median(self._pass)

    def measured_sizes(self) -> list[int]:
        return list(self._sizes)

    def draft_seconds(self, n_drafted: int) -> float:
        """Estimated drafter time of a step that drafts n_drafted tokens (0 until observed): the every-step
        pass, if the drafter has one (it also yields the first draft), plus the per-token cost of the rest."""
        if self._pass:
            return self._pass_median + self._draft_median * max(0, n_drafted - 1)
        return self._draft_median * n_drafted

    def seconds(self, n_tokens: int) -> float:
        """Estimated wall time of a step over n_tokens tokens. Before any measurement the unit is one
        single-token step and the prior slope applies: 1 + prior_slope * (n_tokens - 1)."""
        sizes = self._sizes
        if not sizes:
            return 1.0 + self.prior_slope * (n_tokens - 1)
        med = self._median
        if n_tokens in med:
            return med[n_tokens]
        j = bisect.bisect_left(sizes, n_tokens)
        if 0 < j < len(sizes):
            lo, hi = sizes[j - 1], sizes[j]
            w = (n_tokens - lo) / (hi - lo)
            return med[lo] + w * (med[hi] - med[lo])
        if j == 0:
            # below every measured size: only the forced plain steps of AdaptiveDraft usually land here
            t = med[sizes[0]] - self._slope(False) * (sizes[0] - n_tokens)
            return max(t, 0.25 * med[sizes[0]])
        # above: the slope of the multi-token sizes only; a 1-token step often runs other kernels
        # (mat-vec, not mat-mat), and its jump to 2 tokens says nothing about the cost of more
        return med[sizes[-1]] + self._slope(True) * (n_tokens - sizes[-1])

    def _slope(self, multi: bool) -> float:
        """Seconds per added token over the measured sizes (multi: those above 1 token, if any): least
        squares, never negative; from a single size, prior_slope times its cost per token. Cached: a
        choice asks for it n_max times and a busy server has measured hundreds of sizes."""
        slope = self._slopes.get(multi)
        if slope is None:
            sizes = [n for n in self._sizes if n > 1] if multi else []
            slope = self._slopes[multi] = self._fit(sizes or self._sizes)
        return slope

    def _fit(self, sizes: list[int]) -> float:
        if len(sizes) < 2:
            return self.prior_slope * self._median[sizes[0]] / sizes[0]
        x = [float(n) for n in sizes]
        y = [self._median[n] for n in sizes]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((a - mx) ** 2 for a in x)
        sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
        return max(0.0, sxy / sxx)


class AdaptiveDraft:
    """Per-slot draft-length controller (see the module docstring for the model).

    n_max, n_min: llama.cpp's --spec-draft-n-max / --spec-draft-n-min (a draft shorter than n_min is not
    worth verifying, so choose() returns 0 or a length in [n_min, n_max]). p_min: the confidence threshold
    reported until acceptance and step costs have been measured (llama.cpp's --spec-draft-p-min; its
    default is 0.0 in the llama.cpp this project follows and 0.75 in earlier releases, kept here as the
    cautious start). cost: the StepCost shared by the slots of one model (a private one if omitted).
    decay: weight kept by old acceptance counts at each update (0.95: a memory of ~20 steps). idle_decay:
    the same per step spent in fallback. prior_acceptance / prior_weight: the Beta prior of a position
    never judged. probe_every / probe_max / probe_len: the probing schedule after a fallback.
    """

    def __init__(
        self,
        n_max: int,
        n_min: int = 0,
        p_min: float = 0.75,
        cost: StepCost | None = None,
        decay: float = 0.95,
        idle_decay: float = 0.98,
        prior_acceptance: float = 0.5,
        prior_weight: float = 2.0,
        probe_every: int = 16,
        probe_max: int = 256,
        probe_len: int = 2,
        min_gain: float = 0.01,
    ):
        if n_max < 0 or n_min < 0 or n_min > n_max:
            raise ValueError(f"need 0 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        if not 0.0 <= p_min <= 1.0:
            raise ValueError(f"p_min must be within [0, 1], got {p_min}")
        if not (0.0 < decay <= 1.0 and 0.0 < idle_decay <= 1.0):
            raise ValueError("decay and idle_decay must be within (0, 1]")
        if not (0.0 < prior_acceptance < 1.0 and prior_weight > 0.0):
            raise ValueError("prior_acceptance must be within (0, 1) and prior_weight positive")
        if not 1 <= probe_every <= probe_max:
            raise ValueError("need 1 <= probe_every <= probe_max")
        self.n_max = n_max
        self.n_min = n_min
        self.p_min_start = p_min
        self.cost = cost if cost is not None else StepCost()
        self.decay = decay
        self.idle_decay = idle_decay
        self.prior_acceptance = prior_acceptance
        self.prior_weight = prior_weight
        self.probe_every = probe_every
        self.probe_max = probe_max
        self.probe_len = max(1, probe_len)
        self.min_gain = min_gain  # speculation must beat plain decoding by this fraction: no flapping on ties
        self._succ = [0.0] * n_max  # decayed count of accepts at position j (given j-1 accepted)
        self._tried = [0.0] * n_max  # decayed count of drafts judged at position j
        self._drafted = 0.0  # decayed totals, llama.cpp's acceptance rate: accepted / drafted
        self._accepted = 0.0
        self._k = 0  # last choice
        self._n_other = 0  # tokens of other slots in the step, as of the last choice
        self._steps = 0  # choose() calls
        self._plain_probe = -probe_every  # step of the last plain step forced to measure its cost
        self._idle = 0  # steps in fallback since the last probe
        self._probe_wait = probe_every
        self._probes = 0

    # ------------------------------------------------------------------------------------- observations

    def update(self, n_drafted: int, n_accepted: int) -> None:
        """After a verify: n_drafted tokens were proposed, the first n_accepted of them accepted."""
        if not 0 <= n_accepted <= n_drafted:
            raise ValueError(f"need 0 <= n_accepted <= n_drafted, got {n_accepted} of {n_drafted}")
        if n_drafted == 0:
            return
        d = self.decay
        self._succ = [s * d for s in self._succ]
        self._tried = [t * d for t in self._tried]
        self._drafted = self._drafted * d + n_drafted
        self._accepted = self._accepted * d + n_accepted
        # positions 0..n_accepted-1 were accepted; position n_accepted was judged and rejected; later
        # positions were never judged (they carry no information about their own acceptance)
        for j in range(min(n_accepted, self.n_max)):
            self._succ[j] += 1.0
            self._tried[j] += 1.0
        if n_accepted < n_drafted and n_accepted < self.n_max:
            self._tried[n_accepted] += 1.0

    def observe_cost(self, n_tokens_in_step: int, seconds: float) -> None:
        """A target step over n_tokens_in_step tokens (all slots) took `seconds` (goes to the shared StepCost)."""
        self.cost.observe(n_tokens_in_step, seconds)

    # ---------------------------------------------------------------------------------------- estimates

    def accept_rates(self) -> list[float]:
        """Estimated a_j = P(draft j accepted | drafts before it accepted), j < n_max. A position seldom
        judged leans on the pooled rate of all positions, which leans on the prior."""
        w0 = self.prior_weight
        pooled = (sum(self._succ) + w0 * self.prior_acceptance) / (sum(self._tried) + w0)
        return [(s + w0 * pooled) / (t + w0) for s, t in zip(self._succ, self._tried)]

    @property
    def acceptance(self) -> float:
        """Accepted / drafted tokens over recent steps (llama.cpp's draft acceptance rate); the prior before
        any draft."""
        if self._drafted <= 0.0:
            return self.prior_acceptance
        return self._accepted / self._drafted

    def _optimum(self, n_other: int) -> tuple[int, float, float, float]:
        """(k, E_k, C_k, C_0) maximizing the step's useful tokens per second, (n_other + E_k) / C_k, over the
        allowed lengths; n_other = 0 is the slot's own rate E_k / C_k."""
        cost = self.cost
        c0 = cost.seconds(n_other + 1) + cost.draft_seconds(0)
        best = (0, 1.0, c0)
        best_rate = (n_other + 1.0) * (1.0 + self.min_gain) / c0
        reach, expected = 1.0, 1.0
        for k, a in enumerate(self.accept_rates(), start=1):
            reach *= a
            expected += reach
            if k < self.n_min:
                continue
            c = cost.seconds(n_other + k + 1) + cost.draft_seconds(k)
            if c > 0.0 and (n_other + expected) / c > best_rate:
                best, best_rate = (k, expected, c), (n_other + expected) / c
        return (*best, c0)

    # ------------------------------------------------------------------------------------------- choice

    def choose(self, n_other_tokens: int = 0) -> int:
        """Draft length for this slot's next step (0: plain decode), never above n_max.

        n_other_tokens: the tokens the other slots put in the same step. They set where on the cost curve
        this slot drafts, and they count as useful work (one token each: a decode token emits one, a prompt
        token is work done), so a slot does not buy its own speed-up by slowing a full batch down more.
        """
        if self.n_max == 0:
            self._k = 0
            return 0
        self._n_other = max(0, n_other_tokens)
        self._steps += 1
        sizes = self.cost.measured_sizes()
        if sizes and sizes[0] > self._n_other + 1 and self._steps - self._plain_probe >= self.probe_every:
            # a slot that always drafts never measures a plain step, and extrapolating its cost down from
            # multi-token steps misses the jump from 1 to 2 tokens: take one plain step to measure it
            self._plain_probe = self._steps
            self._k = 0
            return 0
        k = self._optimum(self._n_other)[0]
        if k > 0:
            self._idle = 0
            self._probe_wait = self.probe_every
        else:
            # in fallback: old counts grow stale, and now and then a short draft re-measures acceptance and
            # the verify cost; each probe that does not bring speculation back doubles the wait
            self._succ = [s * self.idle_decay for s in self._succ]
            self._tried = [t * self.idle_decay for t in self._tried]
            self._idle += 1
            if self._idle >= self._probe_wait:
                self._idle = 0
                self._probe_wait = min(2 * self._probe_wait, self.probe_max)
                self._probes += 1
                k = min(self.n_max, max(self.n_min, self.probe_len))
        self._k = k
        return k

    @property
    def p_min(self) -> float:
        """Confidence a drafter should require of a token before drafting it (see the module docstring);
        the configured start value until acceptance and multi-token step costs have been measured."""
        sizes = self.cost.measured_sizes()
        if self._drafted <= 0.0 or len(sizes) < 2:
            return self.p_min_start
        n_other = self._n_other
        k, e, c, c0 = self._optimum(n_other)
        if k == 0:
            # at plain decoding the first drafted token is the margin: break-even is its relative cost
            d_cost = self.cost.seconds(n_other + 2) + self.cost.draft_seconds(1) - c0
            rate = (n_other + 1.0) / c0
        else:
            d_cost = (c - c0) / k
            rate = (n_other + e) / c
        return min(1.0, max(0.0, rate * d_cost))

    def state(self) -> dict:
        """Figures for the server's per-request `timings` and /slots."""
        _k, e, c, c0 = self._optimum(self._n_other)
        return {
            "draft_n_max_chosen": self._k,
            "p_min": round(self.p_min, 4),
            "acceptance": round(self.acceptance, 4),
            "accept_rates": [round(a, 4) for a in self.accept_rates()],
            "expected_tokens_per_step": round(e, 4),
            "expected_speedup": round((e / c) * c0, 4) if c > 0 else 1.0,
            "probes": self._probes,
        }


def _median(values) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])
