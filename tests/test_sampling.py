"""Samplers: each filter on a hand-computed case, the fast candidate search against a plain full-sort chain,
seeds, greedy, penalties, validation, speed, and a chi-square test that the draws follow probs()."""

import math
import time

import numpy as np
import pytest

from nextn.errors import RequestError
from nextn.sampling import Sampler, SamplingParams

P5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
LOGITS = np.log(P5).astype(np.float32)
OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def probs(logits=LOGITS, history=(), **kw):
    return Sampler(SamplingParams(**{"temperature": 1.0, **OFF, **kw})).probs(logits, history)


def chain_probs(logits, history, p: SamplingParams) -> np.ndarray:
    """llama.cpp's default chain written out plainly: whole vocabulary, full sort, one filter at a time."""
    z = np.array(logits, dtype=np.float32)
    if p.repeat_last_n != 0:
        recent = list(history) if p.repeat_last_n < 0 else list(history)[-p.repeat_last_n :]
        for tok in set(recent):
            if not 0 <= tok < len(z):
                continue
            c = recent.count(tok)
            rp = np.float32(p.repeat_penalty)
            z[tok] = z[tok] * rp if z[tok] <= 0 else z[tok] / rp
            z[tok] -= np.float32(c * p.frequency_penalty + p.presence_penalty)
    out = np.zeros(len(z))
    if p.temperature <= 0:
        out[int(np.argmax(z))] = 1.0
        return out
    cand = np.argsort(-z, kind="stable")
    if 0 < p.top_k < len(z):
        cand = cand[: p.top_k]
    if p.top_p < 1.0:
        e = np.exp(z[cand].astype(np.float64) - z[cand[0]])
        cum = np.cumsum(e / e.sum())
        last = next((i for i, c in enumerate(cum) if c >= p.top_p), len(cand) - 1)
        cand = cand[: last + 1]
    if p.min_p > 0.0:
        cand = cand[z[cand] >= np.float32(z[cand[0]] + math.log(p.min_p))]
    e = np.exp((z[cand].astype(np.float64) - z[cand[0]]) / p.temperature)
    out[cand] = e / e.sum()
    return out


# ------------------------------------------------------------------------------------- hand-computed cases


def test_plain_softmax():
    np.testing.assert_allclose(probs(), P5, rtol=1e-6)


def test_top_k():
    np.testing.assert_allclose(probs(top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(probs(top_k=5), P5, rtol=1e-6)  # k >= n_vocab: off


def test_top_p_keeps_shortest_prefix_reaching_p():
    # cumulative 0.5, 0.7, 0.85, 0.95: top_p 0.8 keeps three tokens, 0.7 two (reached exactly), 0 one
    np.testing.assert_allclose(probs(top_p=0.8), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)
    np.testing.assert_allclose(probs(top_p=0.69), np.array([0.5, 0.2, 0, 0, 0]) / 0.7, rtol=1e-6)
    np.testing.assert_allclose(probs(top_p=0.0), [1, 0, 0, 0, 0])


def test_top_p_normalizes_over_top_k():
    # after top_k=3 the mass is 0.5/0.85, 0.2/0.85 = 0.588, 0.824: top_p 0.8 keeps two
    np.testing.assert_allclose(probs(top_k=3, top_p=0.8), np.array([0.5, 0.2, 0, 0, 0]) / 0.7, rtol=1e-6)


def test_min_p_relative_to_top():
    # 0.25 * 0.5 = 0.125: keeps 0.5, 0.2, 0.15
    np.testing.assert_allclose(probs(min_p=0.25), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)


def test_temperature_applies_after_the_filters():
    p = probs(temperature=0.5)
    np.testing.assert_allclose(p, P5**2 / (P5**2).sum(), rtol=1e-6)
    # top_p 0.8 chooses 3 tokens on the T=1 distribution, even though at T=0.5 two would reach 0.8
    p = probs(temperature=0.5, top_p=0.8)
    np.testing.assert_allclose(p, np.r_[P5[:3] ** 2, 0, 0] / (P5[:3] ** 2).sum(), rtol=1e-6)


def test_default_chain_order():
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02])).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.3, seed=0)
    # top_k 5 -> mass .3/.93 .. cumulative .323 .591 .806 .914: top_p keeps 4; min_p 0.3*0.3=0.09 drops 0.08
    kept = np.array([0.3, 0.25, 0.2, 0.1]) ** (1 / 0.8)
    want = np.r_[kept / kept.sum(), 0, 0, 0]
    np.testing.assert_allclose(Sampler(params).probs(logits), want, rtol=1e-6)
    np.testing.assert_allclose(chain_probs(logits, [], params), want, rtol=1e-6)


# ------------------------------------------------------------------------------------------- penalties


def test_penalties_follow_llama_cpp():
    logits = np.array([2.0, -1.0, 0.5, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=2.0, presence_penalty=0.5,
                               frequency_penalty=0.25, **OFF))
    out = s.penalized(logits, [0, 1, 1, 3, 99, -1])  # ids outside the vocabulary are ignored
    # token 0: 2/2 - 0.25 - 0.5; token 1: -1*2 - 2*0.25 - 0.5; token 2 untouched; token 3: 0*2 - 0.25 - 0.5
    np.testing.assert_allclose(out, [0.25, -3.0, 0.5, -0.75])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 0.0])  # the input is not changed


def test_repeat_last_n_window():
    logits = np.array([1.0, 1.0], np.float32)

    def pen(n):
        s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=2.0, repeat_last_n=n))
        return s.penalized(logits, [0, 1])

    np.testing.assert_allclose(pen(1), [1.0, 0.5])
    np.testing.assert_allclose(pen(-1), [0.5, 0.5])
    np.testing.assert_allclose(pen(0), [1.0, 1.0])


def test_penalties_change_greedy_choice():
    logits = np.array([3.0, 2.0, 1.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    assert s.sample(logits, []) == 0
    assert s.sample(logits, [0]) == 1  # 3/2 = 1.5 < 2


# ---------------------------------------------------------------------------------- greedy and seeds


def test_greedy_is_argmax_and_ignores_seed():
    for t in (0.0, -1.0):  # llama-server: temperature <= 0 is greedy
        s = Sampler(SamplingParams(temperature=t, seed=1))
        assert s.sample(LOGITS) == 0
        np.testing.assert_array_equal(s.probs(LOGITS), [1, 0, 0, 0, 0])


def test_seed_reproduces():
    def draws(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed, **OFF))
        return [s.sample(LOGITS) for _ in range(60)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)
    flat = np.zeros(5, np.float32)
    a, b = (Sampler(SamplingParams(temperature=1.0, seed=-1, **OFF)) for _ in range(2))
    assert [a.sample(flat) for _ in range(40)] != [b.sample(flat) for _ in range(40)]  # 5^-40 to fail


def test_chi_square_matches_probs():
    """20000 draws from a 6-token distribution after top-k, top-p and temperature; chi-square at 0.001."""
    logits = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])).astype(np.float32)
    s = Sampler(SamplingParams(temperature=0.7, top_k=6, top_p=0.97, min_p=0.0, seed=7))
    p = s.probs(logits)
    support = np.flatnonzero(p)
    assert len(support) == 6
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=len(p))
    assert counts[p == 0].sum() == 0
    expected = p[support] * n
    chi2 = float((((counts[support] - expected) ** 2) / expected).sum())
    df = len(support) - 1
    # Wilson-Hilferty: chi2 quantile ~ df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3, z(0.999) = 3.0902
    critical = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, (chi2, critical)


# ------------------------------------------------------------------------- fast path vs the plain chain


def _cases():
    rng = np.random.default_rng(3)
    for n in (7, 300, 151936):
        for shape in ("flat", "gauss", "wide", "peaky", "masked"):
            spread = {"flat": 0.2, "gauss": 1.0, "wide": 4.0, "peaky": 2.0, "masked": 2.0}[shape]
            z = rng.standard_normal(n) * spread
            if shape == "peaky":
                z[rng.integers(n)] += 25.0
            if shape == "masked":
                z[rng.random(n) < 0.5] = -np.inf
            yield n, shape, z.astype(np.float32), list(rng.integers(0, n, 20))


PARAMS = [
    SamplingParams(seed=0),  # llama-server defaults
    SamplingParams(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0),
    SamplingParams(temperature=0.6, top_k=0, top_p=1.0, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.02),
    SamplingParams(temperature=0.9, top_k=3, top_p=1.0, min_p=0.0, repeat_penalty=1.3, frequency_penalty=0.2),
    SamplingParams(temperature=1.0, top_k=100, top_p=0.99, min_p=0.0, presence_penalty=1.0, repeat_last_n=-1),
    SamplingParams(temperature=0.0, repeat_penalty=1.5),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_fast_candidates_equal_plain_chain(params):
    for n, shape, z, hist in _cases():
        if n > 1000 and params.top_k == 0 and params.min_p == 0.0 and shape != "peaky":
            continue  # the plain chain's full sort of 150k is slow; the 300-token cases cover this path
        got = Sampler(params).probs(z, hist)
        want = chain_probs(z, hist, params)
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=f"n={n} {shape}")
        assert got.sum() == pytest.approx(1.0)


def test_sample_draws_only_the_support():
    z = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    s = Sampler(SamplingParams(seed=5))
    support = set(np.flatnonzero(s.probs(z)))
    assert {s.sample(z) for _ in range(300)} <= support


def test_bad_logits():
    s = Sampler(SamplingParams())
    with pytest.raises(ValueError, match="NaN"):
        s.sample(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="all -inf"):
        s.sample(np.full(3, -np.inf, np.float32))


def test_large_vocab_is_fast():
    logits = (np.random.default_rng(0).standard_normal(151936) * 3).astype(np.float32)
    history = list(range(64))
    s = Sampler(SamplingParams(seed=1))  # llama-server defaults: top_k 40, top_p 0.95, min_p 0.05
    best = math.inf
    for _ in range(5):  # best of 5 batches: the test machine's cores are shared
        t0 = time.perf_counter()
        for _ in range(20):
            s.sample(logits, history)
        best = min(best, (time.perf_counter() - t0) / 20)
    assert best < 1e-3, f"{best * 1e6:.0f} us per token"


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("field,value", [
    ("top_p", 1.5), ("min_p", -0.1), ("repeat_penalty", 0.0), ("repeat_last_n", -2), ("seed", -2),
    ("top_k", 1.5), ("temperature", "hot"), ("top_k", True), ("temperature", float("nan")),
    ("presence_penalty", float("inf")), ("seed", 2**64),
    # llama-server's ranges: its sampling values are 32-bit floats and top-k a 32-bit int
    ("presence_penalty", -1e308), ("frequency_penalty", -1e308), ("frequency_penalty", 3.5e38),
    ("repeat_penalty", 5e-324), ("repeat_penalty", 1e39), ("temperature", 1e308), ("temperature", -1e39),
    ("top_k", 10**18), ("top_k", -1), ("seed", 10**400), ("seed", 1e300), ("temperature", 10**400),
], ids=lambda v: repr(v)[:16])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)
    assert e.value.http_status == 400


def test_json_numbers_are_normalized():
    p = SamplingParams(top_k=40.0, temperature=1, seed=3.0)
    assert isinstance(p.top_k, int) and p.top_k == 40
    assert isinstance(p.temperature, float) and isinstance(p.seed, int)
    d = SamplingParams()
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty, d.repeat_last_n, d.seed) == \
        (0.8, 40, 0.95, 0.05, 1.0, 64, -1)


def test_the_bounds_of_the_settings_hold_per_request():
    """A request field that is also a [sampling] setting keeps the setting's bounds (engine/config.py)."""
    from nextn.config import iter_fields

    bounds = {k.split(".")[1]: (f.metadata["lo"], f.metadata["hi"])
              for k, f in iter_fields() if k.startswith("sampling.")}
    assert bounds["top_k"] == (0, 2**31 - 1) and bounds["seed"] == (-1, 2**64 - 1)
    assert all(lo is not None and hi is not None for lo, hi in bounds.values())
    for name, (lo, hi) in bounds.items():
        for bad in (lo - max(1, abs(lo)), hi + max(1, abs(hi))):
            with pytest.raises(RequestError, match=name):
                SamplingParams(**{name: bad})
    assert SamplingParams(seed=2**64 - 1, top_k=2**31 - 1).seed == 2**64 - 1


EXTREME = [
    {"presence_penalty": -3.4e38}, {"presence_penalty": 3.4e38}, {"frequency_penalty": -3.4e38},
    {"frequency_penalty": 3.4e38}, {"repeat_penalty": 1e-45}, {"repeat_penalty": 3.4e38},
    {"repeat_penalty": 1e-45, "presence_penalty": 3.4e38}, {"repeat_penalty": 3.4e38, "frequency_penalty": -3.4e38},
    {"temperature": 1e-320}, {"temperature": 1e-30}, {"temperature": 3.4e38}, {"min_p": 1e-300},
    {"top_p": 1e-300}, {"top_k": 2**31 - 1},
]


@pytest.mark.parametrize("extreme", EXTREME, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("chain", [OFF, {"top_k": 40, "top_p": 0.95, "min_p": 0.05}], ids=["off", "filters"])
def test_extreme_values_in_range_still_sample(extreme, chain):
    """Values at the ends of the ranges (penalties of +-3.4e38, a penalty of 1e-45 that divides a logit past
    the float range, temperatures of 1e-320 or 3.4e38) once overflowed to inf and NaN and failed the whole
    batch step: the penalized logits saturate at the largest finite float, so every draw is a real token
    and the distribution is finite - also with banned (ignore_eos) tokens in the history."""
    import warnings

    from nextn.spec.verify import verify_sampled

    z = np.random.default_rng(2).standard_normal(300).astype(np.float32) * 3
    history = [1, 2, 2, 3, 3, 3, 0, 7]
    for banned in ((), (0, 7)):
        s = Sampler(SamplingParams(**{"temperature": 1.0, **chain, "seed": 1, **extreme}), banned)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow or invalid-value warnings either
            pr = s.probs(z, history)
            tok = s.sample(z, history)
            n, nxt = verify_sampled([5, 9], None, np.stack([z, z, z]), s, history)
        assert np.isfinite(pr).all() and pr.sum() == pytest.approx(1.0)
        assert pr[tok] > 0 and not set(np.flatnonzero(pr)) & set(banned)
        assert 0 <= n <= 2 and 0 <= nxt < len(z) and nxt not in banned
        pen = s.penalized(z, history)
        assert not np.isnan(pen).any() and (np.isfinite(pen) | np.isin(np.arange(len(z)), banned)).all()
