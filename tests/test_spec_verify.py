"""Speculative verification: greedy table cases, end-of-generation, errors, seeds, and chi-square tests that
exact speculative sampling emits exactly the plain sampler's distribution - for the first token and for the
first two tokens, with full draft distributions and with point proposals, with and without the filters and
penalties - plus the proof that the same test catches a wrong acceptance rule. Synthetic acceptance: llama.cpp's
rate resolution and the acceptance statistics it promises."""

import logging
import math

import numpy as np
import pytest
from nextn.errors import ConfigError
from nextn.sampling import Sampler, SamplingParams
from nextn.spec import verify as verify_mod
from nextn.spec.verify import SynthAcceptance, synth_rates, verify_greedy, verify_sampled

OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}

# ------------------------------------------------------------------------------------------ chi-square


def gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) = Gamma(a, x) / Gamma(a): the series for P below a + 1,
    Lentz's continued fraction above (Numerical Recipes 6.2). Written here so the tests need no scipy."""
    if x <= 0.0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h


def chi2_sf(chi2: float, df: int) -> float:
    """P(X >= chi2) for a chi-square variable with df degrees of freedom (exact, via gamma_q)."""
    return gamma_q(df / 2.0, chi2 / 2.0)


def chi_square(counts: dict, probs: dict) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of observed counts against exact probabilities. Cells expected
    fewer than 5 times are pooled into one (the usual validity rule); a count in a zero-probability cell gives
    an infinite statistic (p = 0)."""
    n = sum(counts.values())
    if any(probs.get(k, 0.0) <= 0.0 for k, c in counts.items() if c):
        return math.inf, 1, 0.0
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for k, p in probs.items():
        if p * n >= 5.0:
            obs.append(counts.get(k, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(k, 0)
            pool_e += p * n
    if pool_e > 0.0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = float(sum((o - e) ** 2 / e for o, e in zip(obs, exp)))
    df = len(obs) - 1
    return stat, df, chi2_sf(stat, df)


def test_chi2_sf_matches_tables():
    # 0.999 quantiles from the standard chi-square table
    for df, q999 in ((1, 10.828), (2, 13.816), (5, 20.515), (10, 29.588), (30, 59.703), (100, 149.449)):
        assert chi2_sf(q999, df) == pytest.approx(0.001, rel=2e-3)
    assert chi2_sf(0.0, 3) == 1.0
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0), rel=1e-12)  # df=2: exp(-x/2)


def test_chi2_sf_matches_scipy():
    stats = pytest.importorskip(
        "scipy.stats", reason="scipy not installed: gamma_q is checked by the table test"
    )
    for df in (1, 3, 7, 20, 143):
        for x in (0.1, 1.0, df * 0.5, float(df), df * 1.7 + 3.0, df * 3.0 + 20.0):
            assert chi2_sf(x, df) == pytest.approx(float(stats.chi2.sf(x, df)), rel=1e-9, abs=1e-300)


# ------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize(
    "drafts, top, expect",
    [
        ([5, 6, 7], [5, 6, 7, 8], (3, 8)),  # all accepted: the bonus token follows
        ([5, 6, 7], [4, 6, 7, 8], (0, 4)),  # first rejected: the target's own choice
        ([5, 6, 7], [5, 9, 7, 8], (1, 9)),  # middle
        ([5, 6, 7], [5, 6, 1, 8], (2, 1)),  # last
        ([], [3], (0, 3)),  # nothing drafted: a plain decode step
        ([5, 6], [5, 6, 7, 8], (2, 7)),  # extra rows are ignored
    ],
)
def test_verify_greedy_table(drafts, top, expect):
    assert verify_greedy(drafts, top) == expect


def test_verify_greedy_eog_ends_the_step():
    assert verify_greedy([5, 2, 7], [5, 2, 7, 8], eog={2}) == (1, 2)
    assert verify_greedy([5, 6, 2], [5, 6, 2, 8], eog={2}) == (2, 2)  # no bonus token after the end
    assert verify_greedy([5, 2, 7], [5, 3, 7, 8], eog={2}) == (1, 3)  # a rejected EOG draft is no end


def test_verify_greedy_needs_enough_rows():
    with pytest.raises(ValueError, match="need 4 target rows"):
        verify_greedy([1, 2, 3], [1, 2, 3])


def test_sampled_with_greedy_params_matches_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32)
    top = [int(t) for t in logits.argmax(axis=1)]
    s = Sampler(SamplingParams(temperature=0.0))
    for drafts in ([top[0], top[1], top[2], top[3]], [top[0], 0 if top[1] else 1, 7, 7], [9, 9, 9, 9]):
        assert verify_sampled(drafts, None, logits, s, [1, 2]) == verify_greedy(drafts, top)


def test_greedy_penalties_see_the_drafts():
    """A token drafted at row 0 is penalized at row 1 (it is in the history by then), which changes the
    argmax there; a device argmax could not know this."""
    logits = np.zeros((3, 6), dtype=np.float32)
    logits[0, 4] = 2.0
    logits[1, 4] = 2.0
    logits[1, 3] = 1.5
    logits[2, 1] = 1.0
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=8))
    # row 1 with 4 in the history: 4 -> 2.0 / 2 = 1.0 < 1.5, so the target picks 3 there
    assert verify_sampled([4, 4], None, logits, s, [0]) == (1, 3)
    assert verify_sampled([4, 3], None, logits, s, [0]) == (2, 1)


# -------------------------------------------------------------------------------------- a toy model

V = 12
_r = np.random.default_rng(20240611)
# a bigram "model": the target's logits for the next token depend on the previous token only
TARGET = _r.normal(0.0, 1.6, size=(V, V)).astype(np.float32)
# the drafter: related to the target but clearly different, and blind to a few tokens (q = 0 where p > 0)
DRAFT = (0.5 * TARGET + _r.normal(0.0, 1.2, size=(V, V))).astype(np.float32)
DRAFT[:, [3, 8]] = -np.inf


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def draft_sampled(last, n, rng):
    """d_i sampled from q_i = softmax(DRAFT[prev]); returns drafts and their full distributions."""
    drafts, qs = [], []
    for _ in range(n):
        q = softmax(DRAFT[last].astype(np.float64)).astype(np.float32)
        d = int(rng.choice(V, p=q / q.sum()))
        drafts.append(d)
        qs.append(q)
        last = d
    return drafts, qs


# the table of a point drafter: the target's argmax blurred, so that most guesses are good ones
GUESS = np.argmax(TARGET + _r.normal(0.0, 0.8, size=(V, V)), axis=1)


def draft_points(last, n, rng):
    """Point proposals: an n-gram-like guess from a fixed table, now and then a random token - q is a unit
    mass, passed as None."""
    drafts = []
    for _ in range(n):
        last = int(rng.integers(V)) if rng.random() < 0.2 else int(GUESS[last])
        drafts.append(last)
    return drafts, None


def exact_pair(sampler, history):
    """The plain sampler's exact distribution of the first token and of the first two tokens."""
    p1 = sampler.probs(TARGET[history[-1]], history)
    first = {t: float(p1[t]) for t in range(V) if p1[t] > 0}
    pair = {}
    for t1, pr1 in first.items():
        p2 = sampler.probs(TARGET[t1], list(history) + [t1])
        for t2 in range(V):
            if p2[t2] > 0:
                pair[(t1, t2)] = pr1 * float(p2[t2])
    return first, pair


def run_pairs(verify, params, drafter, n_draft=3, draws=20000, seed=7, history=(0, 5, 5, 9)):
    """The first two tokens emitted by a speculative loop (drafter -> target rows -> verify), `draws` times
    from the same start; returns counts of the first token and of the pair, and the mean accepted length."""
    sampler = Sampler(SamplingParams(**params, seed=seed))
    drng = np.random.default_rng(seed + 1)
    first, pair, accepted, steps = {}, {}, 0, 0
    for _ in range(draws):
        hist = list(history)
        out = []
        while len(out) < 2:
            drafts, qs = drafter(hist[-1], n_draft, drng)
            rows = TARGET[[hist[-1]] + drafts]  # row i: the target's logits after d_i
            n, nxt = verify(drafts, qs, rows, sampler, hist)
            accepted += n
            steps += 1
            new = drafts[:n] + [nxt]
            out += new
            hist += new
        first[out[0]] = first.get(out[0], 0) + 1
        key = (out[0], out[1])
        pair[key] = pair.get(key, 0) + 1
    return first, pair, accepted / steps


def check_exact(params, drafter, verify=verify_sampled, history=(0, 5, 5, 9), draws=20000):
    first_c, pair_c, mean_acc = run_pairs(verify, params, drafter, draws=draws, history=history)
    first_p, pair_p = exact_pair(Sampler(SamplingParams(**params)), list(history))
    return chi_square(first_c, first_p), chi_square(pair_c, pair_p), mean_acc


T1 = {"temperature": 1.0, **OFF}
FILTERED = {
    "temperature": 0.8,
    "top_k": 8,
    "top_p": 0.9,
    "min_p": 0.03,
    "repeat_penalty": 1.5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repeat_last_n": 4,
}


@pytest.mark.parametrize(
    "params, drafter",
    [(T1, draft_sampled), (FILTERED, draft_sampled), (T1, draft_points), (FILTERED, draft_points)],
    ids=["t1-sampled-q", "filters+penalties-sampled-q", "t1-point", "filters+penalties-point"],
)
def test_speculative_sampling_is_exact(params, drafter):
    """20000 two-token continuations: first token and pair against the plain sampler's exact distribution,
    chi-square at significance 0.001 (p-value from the exact chi-square survival function above)."""
    (s1, df1, p1), (s2, df2, p2), mean_acc = check_exact(params, drafter)
    print(
        f"first: chi2={s1:.1f} df={df1} p={p1:.3f}; pair: chi2={s2:.1f} df={df2} p={p2:.3f}; "
        f"accepted/step={mean_acc:.2f}"
    )
    assert p1 > 0.001 and p2 > 0.001
    assert mean_acc > 0.15  # drafts are really accepted: the test exercises acceptance, not only resampling


def wrong_accept_if_more_likely(drafts, draft_probs, target_logits, sampler, history, eog=()):
    """WRONG: accept d_i iff p(d_i) >= q(d_i) (no coin), resample from the residual otherwise."""
    for i, d in enumerate(drafts):
        p = sampler.probs(target_logits[i], list(history) + list(drafts[:i]))
        q = draft_probs[i]
        if p[d] >= q[d]:
            continue
        r = np.maximum(p - q, 0.0)
        return i, int(sampler.rng.choice(len(r), p=r / r.sum()))
    return len(drafts), sampler.sample(target_logits[len(drafts)], list(history) + list(drafts))


def wrong_resample_from_p(drafts, draft_probs, target_logits, sampler, history, eog=()):
    """WRONG: the right coin, but a rejection resamples from p instead of max(0, p - q)."""
    for i, d in enumerate(drafts):
        hist = list(history) + list(drafts[:i])
        p = sampler.probs(target_logits[i], hist)
        q_d = 1.0 if draft_probs is None else float(draft_probs[i][d])
        if sampler.rng.random() * q_d < p[d]:
            continue
        return i, sampler.sample(target_logits[i], hist)
    return len(drafts), sampler.sample(target_logits[len(drafts)], list(history) + list(drafts))


def wrong_penalties_ignore_drafts(drafts, draft_probs, target_logits, sampler, history, eog=()):
    """WRONG, subtly: the right rule, but every row is penalized with the history before the drafts."""
    return verify_sampled(drafts, draft_probs, target_logits, _NoDraftHistory(sampler, len(history)), history)


class _NoDraftHistory:
    """A sampler whose penalties see only the history, not the drafts verify_sampled appends to it (it passes
    the last repeat_last_n history tokens, then the drafts)."""

    def __init__(self, sampler, n_hist):
        self.s, self.params, self.rng = sampler, sampler.params, sampler.rng
        self.keep = min(n_hist, sampler.params.repeat_last_n)

    def candidates(self, logits, history=()):
        return self.s.candidates(logits, list(history)[: self.keep])


@pytest.mark.parametrize(
    "wrong, params, drafter",
    [
        (wrong_accept_if_more_likely, T1, draft_sampled),
        (wrong_resample_from_p, T1, draft_sampled),
        (wrong_resample_from_p, T1, draft_points),
        (wrong_penalties_ignore_drafts, FILTERED, draft_sampled),
    ],
    ids=["accept-if-p>=q", "resample-from-p", "resample-from-p-point", "penalties-ignore-drafts"],
)
def test_wrong_rules_are_detected(wrong, params, drafter):
    """The same test fails a verifier that is almost right: the chi-square test has teeth (a quarter of the
    draws already gives p-values far below 0.001)."""
    (s1, df1, p1), (s2, df2, p2), _ = check_exact(params, drafter, verify=wrong, draws=5000)
    print(
        f"{wrong.__name__}: first chi2={s1:.1f} df={df1} p={p1:.2e}; pair chi2={s2:.1f} df={df2} p={p2:.2e}"
    )
    assert min(p1, p2) < 0.001


# ---------------------------------------------------------------------------------- sampled details


def test_fast_full_vocab_target_equals_sampler_probs():
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 3.0, size=1000).astype(np.float32)
    z[[5, 17]] = -np.inf
    for params in (T1, {**OFF, "temperature": 0.6, "repeat_penalty": 1.3, "frequency_penalty": 0.2}):
        s = Sampler(SamplingParams(**params))
        ids, pr = verify_mod._target(s, z, [1, 2, 2, 17])
        assert ids is None
        np.testing.assert_allclose(pr, s.probs(z, [1, 2, 2, 17]), rtol=2e-5, atol=1e-12)
    s = Sampler(SamplingParams(**T1))
    with pytest.raises(ValueError, match="NaN"):
        verify_mod._target(s, np.full(10, np.nan, dtype=np.float32), [])


def test_seed_reproduces():
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(4, 40)).astype(np.float32)
    q = [softmax(rng.normal(size=40)) for _ in range(3)]

    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [verify_sampled([1, 2, 3], q, logits, s, [0]) for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_sampled_eog_ends_the_step():
    logits = np.full((3, 5), -5.0, dtype=np.float32)
    logits[0, 2] = 10.0  # the target is sure of the EOG token 2
    s = Sampler(SamplingParams(temperature=1.0, seed=1, **OFF))
    for _ in range(20):
        assert verify_sampled([2, 4], None, logits, s, [0], eog={2}) == (0, 2)


def test_point_proposal_the_target_is_sure_of_is_always_accepted():
    logits = np.full((3, 5), -30.0, dtype=np.float32)
    logits[0, 1] = 0.0
    logits[1, 3] = 0.0
    s = Sampler(SamplingParams(temperature=1.0, seed=1, **OFF))
    n, _nxt = verify_sampled([1, 3], None, logits, s, [0])
    assert n == 2


def test_draft_outside_its_own_distribution_is_an_error():
    logits = np.zeros((2, 4), dtype=np.float32)
    q = np.array([0.5, 0.5, 0.0, 0.0])
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    with pytest.raises(ValueError, match="sampled from"):
        verify_sampled([2], [q], logits, s, [])


def test_shape_errors():
    s = Sampler(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="target rows"):
        verify_sampled([1, 2], None, np.zeros((2, 4), dtype=np.float32), s, [])
    with pytest.raises(ValueError, match="draft distributions"):
        verify_sampled([1, 2], [None], np.zeros((3, 4), dtype=np.float32), s, [])


def test_only_needed_rows_are_computed():
    """A rejection at d_1 must not touch the later rows (they are the costly part on a 150k vocabulary)."""

    class Rows:
        def __init__(self, a):
            self.a, self.seen = a, set()

        def __len__(self):
            return len(self.a)

        def __getitem__(self, i):
            self.seen.add(i)
            return self.a[i]

    z = np.full((4, 6), -20.0, dtype=np.float32)
    z[:, 0] = 0.0
    rows = Rows(z)
    s = Sampler(SamplingParams(temperature=1.0, seed=0, **OFF))
    assert verify_sampled([5, 0, 0], None, rows, s, []) == (0, 0)  # p(5) ~ 1e-9: rejected
    assert rows.seen == {0}


def test_large_vocab_is_fast():
    """N=8 drafts all accepted on a 151936-token vocabulary (9 rows, the worst case): ~0.8 ms with the default
    chain and ~2.3 ms with every filter off, measured on the 2-core dev machine; the bounds leave room for a
    loaded machine and still catch a return to full sorts (~35 ms) or full probs() per row."""
    import time

    n_vocab, n = 151936, 8
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((n + 1, n_vocab)) * 2.0).astype(np.float32)
    drafts = [int(t) for t in logits[:n].argmax(axis=1)]
    logits[np.arange(n), drafts] += 30.0  # the target is sure of every draft
    for params, bound in ((SamplingParams(seed=1), 0.008), (SamplingParams(seed=1, **OFF), 0.02)):
        s = Sampler(params)
        best = math.inf
        for _ in range(3):  # best of 3: the cores are shared
            t0 = time.perf_counter()
            assert verify_sampled(drafts, None, logits, s, [1, 2, 3])[0] == n
            best = min(best, time.perf_counter() - t0)
        print(f"verify_sampled N=8 vocab {n_vocab} {params}: {best * 1e3:.2f} ms")
        assert best < bound


# ------------------------------------------------------------------------------------------- synth


def test_synth_rates_follow_llama_cpp():
    r = synth_rates(4, length=3.4)  # llama.cpp tests/test-arg-parser.cpp
    assert r == pytest.approx([0.80581, 0.64933, 0.52323, 0.42163], abs=1e-5)
    assert 1.0 + sum(r) == pytest.approx(3.4, abs=1e-8)
    assert synth_rates(4, length=1.0) == [0.0] * 4
    assert synth_rates(4, length=5.0) == [1.0] * 4
    assert synth_rates(3, rates=[0.9, 0.5, 0.5]) == [0.9, 0.5, 0.5]
    bad = [
        {"length": 5.1},
        {"length": math.nan},
        {"length": 0.0},
        {"rates": [0.8, 0.6, 0.4]},  # 3 values for n_max 4
        {"rates": [0.8, 0.9, 0.4, 0.1]},  # increasing
        {"rates": [1.2, 0.9, 0.4, 0.1]},
        {"rates": [0.8, 0.6, 0.4, 0.1], "length": 2.0},
        {},
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            synth_rates(4, **kw)
    with pytest.raises(ConfigError, match="at least one"):
        synth_rates(0, length=1.0)


def test_synth_statistics_match_rates(caplog):
    rates = [0.9, 0.6, 0.5, 0.2]
    verify_mod._warned.discard(tuple(rates))
    with caplog.at_level(logging.WARNING, logger="nextn.spec.verify"):
        synth = SynthAcceptance(4, rates=rates, seed=3)
        assert "NOT valid" in caplog.text
        caplog.clear()
        SynthAcceptance(4, rates=rates, seed=4)  # the next slot with the same settings: said once
        assert "NOT valid" not in caplog.text
    trials = 20000
    n = np.array([synth.n_accepted([1, 2, 3, 4]) for _ in range(trials)])
    for i, r in enumerate(rates):
        frac = float((n >= i + 1).mean())
        assert abs(frac - r) < 4.0 * math.sqrt(r * (1 - r) / trials) + 1e-9, (i, frac, r)
    assert float((1 + n).mean()) == pytest.approx(synth.mean_length, abs=0.03)


def test_synth_mean_length():
    synth = SynthAcceptance(6, length=3.2, seed=4)
    n = np.array([synth.n_accepted([7] * 6) for _ in range(20000)])
    assert float((1 + n).mean()) == pytest.approx(3.2, abs=0.03)
    # fewer drafts than n_max: the rates of the first positions apply
    assert max(synth.n_accepted([7, 7]) for _ in range(100)) == 2


def test_synth_never_accepts_eog_and_emits_the_target_token():
    synth = SynthAcceptance(3, length=4.0, seed=5)  # accepts everything
    assert synth.n_accepted([1, 2, 3]) == 3
    assert synth.n_accepted([1, 2, 3], eog={2}) == 1
    logits = np.full((4, 6), -30.0, dtype=np.float32)
    logits[1, 5] = 0.0  # the target's token after d_1
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    assert synth.verify([1, 2, 3], logits, s, [0], eog={2}) == (1, 5)
