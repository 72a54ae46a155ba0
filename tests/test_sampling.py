"""Samplers: each filter on a hand-computed case, seeds, penalties, and a chi-square test of the draws."""

import numpy as np
import pytest

from nextn.errors import RequestError
from nextn.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def probs(**kw):
    return Sampler(SamplingParams(**{"temperature": 1.0, **OFF, **kw})).probs(LOGITS)


def test_plain_softmax():
    np.testing.assert_allclose(probs(), [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-6)


def test_greedy_is_argmax_and_ignores_seed():
    s = Sampler(SamplingParams(temperature=0.0, seed=1))
    assert s.sample(LOGITS) == 0
    np.testing.assert_array_equal(s.probs(LOGITS), [1, 0, 0, 0, 0])


def test_top_k():
    np.testing.assert_allclose(probs(top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # cumulative 0.5, 0.7, 0.85: top_p=0.8 keeps three tokens
    np.testing.assert_allclose(probs(top_p=0.8), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)


def test_min_p_relative_to_top():
    # min_p 0.25 of 0.5 = 0.125: keeps 0.5, 0.2, 0.15
    np.testing.assert_allclose(probs(min_p=0.25), np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, rtol=1e-6)


def test_temperature_sharpens():
    p = probs(temperature=0.5)
    want = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(p, want / want.sum(), rtol=1e-6)


def test_penalties_follow_llama_cpp():
    logits = np.array([2.0, -1.0, 0.5, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=2.0, presence_penalty=0.5,
                               frequency_penalty=0.25, **OFF))
    out = s.penalized(logits, [0, 1, 1, 3])
    # token 0: 2/2 - 0.25 - 0.5; token 1: -1*2 - 0.5 - 0.5; token 2 untouched; token 3: 0 -> 0*2 - 0.25 - 0.5
    np.testing.assert_allclose(out, [0.25, -3.0, 0.5, -0.75])


def test_repeat_last_n_window():
    logits = np.array([1.0, 1.0], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=2.0, repeat_last_n=1, **OFF))
    np.testing.assert_allclose(s.penalized(logits, [0, 1]), [1.0, 0.5])


def test_seed_reproduces():
    a = Sampler(SamplingParams(temperature=1.0, seed=42, **OFF))
    b = Sampler(SamplingParams(temperature=1.0, seed=42, **OFF))
    assert [a.sample(LOGITS) for _ in range(50)] == [b.sample(LOGITS) for _ in range(50)]


def test_chi_square_matches_probs():
    """10000 draws at temperature 0.7 with top_k 4; chi-square at significance 0.001 (df=3: 16.27)."""
    params = SamplingParams(temperature=0.7, top_k=4, top_p=1.0, min_p=0.0, seed=7)
    s = Sampler(params)
    p = s.probs(LOGITS)
    n = 10000
    counts = np.bincount([s.sample(LOGITS) for _ in range(n)], minlength=5)
    assert counts[4] == 0
    exp = p[:4] * n
    chi2 = float((((counts[:4] - exp) ** 2) / exp).sum())
    assert chi2 < 16.27, chi2


def test_large_vocab_is_fast():
    import time

    logits = np.random.default_rng(0).standard_normal(151936).astype(np.float32)
    s = Sampler(SamplingParams(seed=1))  # llama-server defaults: top_k 40
    s.sample(logits)
    t0 = time.perf_counter()
    for _ in range(50):
        s.sample(logits, [1, 2, 3])
    per = (time.perf_counter() - t0) / 50
    assert per < 5e-3, per


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 1.5), ("min_p", -0.1),
                                         ("repeat_penalty", 0.0), ("seed", -2), ("top_k", 1.5),
                                         ("temperature", "hot"), ("top_k", True)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)
