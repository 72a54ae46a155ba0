"""Adaptive draft length on simulated slots: long drafts when acceptance is high and verify is cheap, fallback
to plain decoding (and later probes) when speculation costs more than it gains, recovery when acceptance comes
back, the n_min/n_max bounds, the batch-aware cost curve, p_min following acceptance, and StepCost's
estimates."""

import numpy as np
import pytest
from nextn.spec.adaptive import AdaptiveDraft, StepCost


def cheap(n):  # a memory-bound device: each added token costs 5% of a step
    return 1.0 + 0.05 * (n - 1)


def flat_1_5(n):  # any multi-token step costs 1.5 single-token steps
    return 1.0 if n == 1 else 1.5


def simulate(ctl, acceptance, cost, steps, rng, noise=0.03, n_other=0):
    """Runs `steps` steps of one slot: the controller chooses k, the step is timed by cost(n_other + k + 1)
    (with noise), each draft is accepted with probability `acceptance` (a function of the step or a number)
    until the first rejection. Returns the chosen lengths."""
    ks = []
    for t in range(steps):
        k = ctl.choose(n_other)
        assert 0 <= k <= ctl.n_max
        ks.append(k)
        ctl.observe_cost(n_other + k + 1, cost(n_other + k + 1) * (1.0 + noise * rng.standard_normal()))
        if k:
            a = acceptance(t) if callable(acceptance) else acceptance
            n = 0
            while n < k and rng.random() < a:
                n += 1
            ctl.update(k, n)
    return ks


def test_high_acceptance_drafts_long():
    rng = np.random.default_rng(1)
    for cost in (cheap, flat_1_5):
        ctl = AdaptiveDraft(n_max=8)
        ks = simulate(ctl, 0.9, cost, 200, rng)
        assert np.mean(ks[-100:]) >= 7.0, (cost.__name__, ks[-20:])
        st = ctl.state()
        assert st["expected_speedup"] > 3.0
        assert st["acceptance"] > 0.5


def test_low_acceptance_with_costly_verify_falls_back_and_probes():
    rng = np.random.default_rng(2)
    ctl = AdaptiveDraft(n_max=8, probe_every=16, probe_max=256)
    ks = simulate(ctl, 0.1, flat_1_5, 1500, rng)
    assert all(k == 0 for k in ks[20:40]), ks[:40]  # fell back within a few steps
    spec_steps = [t for t, k in enumerate(ks) if k > 0 and t >= 40]
    assert spec_steps, "never probed again after falling back"
    assert len(spec_steps) < 0.05 * (len(ks) - 40)  # probes are rare
    gaps = np.diff([t for t, k in enumerate(ks) if k > 0 and t >= 20])
    assert gaps.max() >= 64  # the wait between probes grew
    assert ctl.state()["probes"] >= 3
    assert ctl.state()["draft_n_max_chosen"] in (0, 2)


def test_recovers_when_acceptance_returns():
    rng = np.random.default_rng(3)
    ctl = AdaptiveDraft(n_max=6)
    ks = simulate(ctl, lambda t: 0.05 if t < 400 else 0.95, flat_1_5, 1000, rng)
    assert np.mean(ks[300:400]) < 0.5
    assert np.mean(ks[-100:]) >= 5.0, ks[-30:]


def test_compute_bound_never_speculates_for_long():
    rng = np.random.default_rng(4)
    ctl = AdaptiveDraft(n_max=8)
    ks = simulate(ctl, 0.9, lambda n: float(n), 400, rng)  # k+1 tokens cost k+1 steps: nothing to gain
    assert np.mean(ks[-300:]) < 0.2
    assert ctl.p_min > 0.9  # no token is worth drafting


def test_bounds_n_min_n_max():
    rng = np.random.default_rng(5)
    for acceptance in (0.05, 0.4, 0.7, 0.99):
        for cost in (cheap, flat_1_5):
            ctl = AdaptiveDraft(n_max=5, n_min=3)
            ks = simulate(ctl, acceptance, cost, 300, rng)
            assert set(ks) <= {0, 3, 4, 5}, (acceptance, cost.__name__, sorted(set(ks)))
    ctl = AdaptiveDraft(n_max=0)
    assert ctl.choose() == 0
    with pytest.raises(ValueError):
        AdaptiveDraft(n_max=2, n_min=3)
    with pytest.raises(ValueError):
        AdaptiveDraft(n_max=2, p_min=1.5)


def test_other_slots_move_the_operating_point():
    """A step is flat up to 16 tokens and linear after (a device that saturates): alone the slot drafts
    long; in a step already holding 64 tokens of other slots every added token costs, so it stops."""
    rng = np.random.default_rng(6)

    def knee(n):
        return max(1.0, n / 16.0)

    cost = StepCost()
    alone = AdaptiveDraft(n_max=8, cost=cost)
    ks = simulate(alone, 0.6, knee, 200, rng)
    assert np.mean(ks[-50:]) >= 6
    crowded = AdaptiveDraft(n_max=8, cost=cost)
    ks = simulate(crowded, 0.6, knee, 300, rng, n_other=64)
    assert np.mean(ks[-100:]) < 0.5


def test_p_min_follows_acceptance():
    rng = np.random.default_rng(7)
    values = {}
    for acceptance in (0.3, 0.6, 0.9):
        ctl = AdaptiveDraft(n_max=8, p_min=0.75)
        assert ctl.p_min == 0.75  # nothing measured yet: the configured start
        simulate(ctl, acceptance, cheap, 300, rng, noise=0.0)
        values[acceptance] = ctl.p_min
        assert 0.0 <= ctl.p_min <= 1.0
        assert ctl.state()["p_min"] == pytest.approx(ctl.p_min, abs=1e-4)
    assert values[0.3] < values[0.6] < values[0.9], values


def test_update_counts_positions():
    ctl = AdaptiveDraft(n_max=4, decay=1.0, prior_weight=1e-9)
    ctl.update(4, 2)  # positions 0, 1 accepted; 2 rejected; 3 never judged
    ctl.update(3, 3)
    rates = ctl.accept_rates()
    assert rates[0] == pytest.approx(1.0) and rates[1] == pytest.approx(1.0)
    assert rates[2] == pytest.approx(0.5)
    assert ctl.acceptance == pytest.approx(5 / 7)
    ctl.update(0, 0)  # nothing drafted: no information
    assert ctl.acceptance == pytest.approx(5 / 7)
    with pytest.raises(ValueError):
        ctl.update(2, 3)
    st = ctl.state()
    for key in ("draft_n_max_chosen", "p_min", "acceptance", "accept_rates", "expected_tokens_per_step"):
        assert key in st


def test_step_cost_estimates():
    c = StepCost(window=5, prior_slope=0.1)
    assert c.seconds(1) == 1.0 and c.seconds(11) == pytest.approx(2.0)  # unit prior before measurements
    for _ in range(5):
        c.observe(1, 0.010)
        c.observe(5, 0.014)
    c.observe(5, 1.0)  # one step slowed by another process: the median ignores it
    assert c.seconds(5) == pytest.approx(0.014)
    assert c.seconds(3) == pytest.approx(0.012)  # interpolated
    c.observe(9, 0.018)
    assert c.seconds(13) == pytest.approx(0.022)  # extrapolated with the slope of the multi-token sizes
    c.observe(0, 1.0)
    c.observe(2, float("nan"))
    assert c.measured_sizes() == [1, 5, 9]
    assert c.draft_seconds(3) == 0.0
    c.observe_draft(4, 0.004)
    assert c.draft_seconds(3) == pytest.approx(0.003)


def test_plain_step_is_measured_when_always_drafting():
    """A slot that always drafts would only ever measure multi-token steps; it takes a plain step now and
    then so that the 1-token cost (often a different kernel) is known, not extrapolated."""
    rng = np.random.default_rng(8)
    ctl = AdaptiveDraft(n_max=4)
    ks = simulate(ctl, 0.1, flat_1_5, 60, rng)
    assert 1 in ctl.cost.measured_sizes()
    assert np.mean(ks[-30:]) < 0.5  # with the jump 1 -> 1.5 measured, low acceptance does not pay


def test_a_pass_the_drafter_runs_at_every_step_counts_for_plain_decoding_too():
    """The MTP block runs over every step's tokens whether the slot drafts or not (its KV must hold every
    position), and that pass yields the first draft. Figures as measured on the embedded default model on a
    2-core CPU: step(1) 400 us, step(2) 503 us, the pass 250 us, a further draft 250 us, acceptance 0.8.
    Drafting one token is then 1.8 tokens per 0.75 ms against 1 per 0.65 ms; counting the pass against
    drafting only (as once done) chose plain decoding, which was slower than either."""
    def controller(cost):
        ctl = AdaptiveDraft(n_max=3, cost=cost)
        for _ in range(10):
            for accepted in (1, 1, 1, 1, 0):
                ctl.update(1, accepted)
        return ctl

    def measured():
        c = StepCost()
        for _ in range(5):
            for n, us in ((1, 400), (2, 503), (3, 560), (4, 605)):
                c.observe(n, us * 1e-6)
        return c

    c = measured()
    for _ in range(5):
        c.observe_draft_pass(250e-6)
        c.observe_draft(1, 250e-6)
    assert c.draft_seconds(0) == pytest.approx(250e-6) and c.draft_seconds(3) == pytest.approx(750e-6)
    assert controller(c).choose() == 1
    old = measured()  # the same time, all of it counted per drafted token
    for _ in range(5):
        old.observe_draft(1, 500e-6)
    assert controller(old).choose() == 0
