"""The numpy reference forward: against llama.cpp's own logits, and consistent with itself (chained calls,
chunked prompts, rollback), plus the properties of its RoPE and attention pieces."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from nextn.devtools.tiny import make_tiny
from reference import ReferenceModel, attention, rope

LLAMACPP = Path(__file__).parent / "data" / "llamacpp"


@pytest.mark.parametrize("name", ["qwen3-tied-f32", "llama-untied-f32"])
def test_matches_llama_cpp(name):
    case = json.loads((LLAMACPP / "cases.json").read_text())[name]
    want = np.load(LLAMACPP / f"{name}.logits.npy")
    ref = ReferenceModel(LLAMACPP / f"{name}.gguf")
    got = ref.forward(case["tokens"])
    assert got.shape == want.shape
    # llama.cpp computes in float32; its rounding is ~1e-6 of logits spanning ~50
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen35", "qwen35moe"])
def model_path(request, tmp_path_factory):
    # the chaining, chunking and rollback properties hold for every architecture: the hybrid ones carry
    # their recurrent states across calls like the KV cache (their own checks: tests/test_reference_qwen35.py)
    return make_tiny(tmp_path_factory.mktemp("ref") / f"{request.param}.gguf", arch=request.param, seed=5)


PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11, 300]


def test_one_by_one_equals_batch(model_path):
    ref = ReferenceModel(model_path)
    full = ref.forward(PROMPT)
    ref.reset()
    steps = np.concatenate([ref.forward([t], i) for i, t in enumerate(PROMPT)])
    np.testing.assert_allclose(steps, full, atol=1e-9)
    ref.reset()
    pairs = np.concatenate([ref.forward(PROMPT[i : i + 2], i) for i in range(0, len(PROMPT), 2)])
    np.testing.assert_allclose(pairs, full, atol=1e-9)


@pytest.mark.parametrize("cuts", [(5,), (1, 7), (3, 4, 11)])
def test_chunked_prompt_equals_full(model_path, cuts):
    ref = ReferenceModel(model_path)
    full = ref.forward(PROMPT)
    ref.reset()
    bounds = [0, *cuts, len(PROMPT)]
    parts = [ref.forward(PROMPT[a:b], a) for a, b in itertools.pairwise(bounds)]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-9)
    assert ref.n_past == len(PROMPT)


def test_rollback_recomputes(model_path):
    ref = ReferenceModel(model_path)
    full = ref.forward(PROMPT)
    ref.forward([1, 2, 3], len(PROMPT))  # speculative tokens, then rejected
    again = ref.forward(PROMPT[8:], 8)  # rewinds to position 8
    np.testing.assert_allclose(again, full[8:], atol=1e-9)
    with pytest.raises(ValueError, match="only 12 positions are cached"):
        ref.forward([1], 13)
    with pytest.raises(ValueError, match="out of range"):
        ref.forward([ref.n_vocab])


def test_greedy_chains_forward(model_path):
    ref = ReferenceModel(model_path)
    out = ref.greedy(PROMPT, 6)
    ref.reset()
    seq = PROMPT + out[:-1]
    logits = ref.forward(seq)
    assert [int(i) for i in logits[len(PROMPT) - 1 :].argmax(axis=1)] == out


def test_tied_head_is_token_embd(tmp_path):
    ref = ReferenceModel(make_tiny(tmp_path / "t.gguf", arch="qwen3", tied=True))
    assert "output.weight" not in ref.w and ref.output is ref.tok_embd


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_trace_records_llama_cpp_names(arch, tmp_path):
    # the dense graph's names (the hybrid ones: tests/test_reference_qwen35.py)
    ref = ReferenceModel(make_tiny(tmp_path / f"{arch}.gguf", arch=arch, seed=5))
    ref.trace = {}
    ref.forward(PROMPT[:3])
    assert {"attn_norm-0", "Qcur-0", "Kcur-0", "Vcur-0", "ffn_inp-1", "ffn_out-1", "l_out-1",
            "result_norm", "result_output"} <= set(ref.trace)
    assert ref.trace["Qcur-0"].shape == (3, ref.n_head, ref.n_embd_head_k)


# ---------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_rope_properties(mode):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 3, 16))
    # position 0 is the identity; rotation keeps the norm; dims past n_rot pass through
    np.testing.assert_allclose(rope(q, [0], 16, mode, 10000.0), q)
    r = rope(q, [7], 12, mode, 10000.0)
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1))
    np.testing.assert_array_equal(r[..., 12:], q[..., 12:])

    # q.k after rotation depends only on the distance between positions
    def dot(pq, pk):
        return float(np.sum(rope(q, [pq], 16, mode, 100.0) * rope(k, [pk], 16, mode, 100.0)))

    assert dot(9, 4) == pytest.approx(dot(25, 20), abs=1e-9)


def test_rope_modes_differ_by_pair_order():
    # NEOX pairs (i, i+half) are NORM's adjacent pairs after de-interleaving the dimensions
    x = np.random.default_rng(1).standard_normal((2, 3, 8))
    perm = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # neox dim order -> norm's adjacent pairs
    neox = rope(x, [3, 11], 8, "neox", 10000.0)
    norm = rope(x[..., perm], [3, 11], 8, "norm", 10000.0)
    np.testing.assert_allclose(norm, neox[..., perm])
    # and the frequency of pair i is base^(-2i/n_rot): at pos 1 pair 0 turns by exactly 1 radian
    e = np.zeros((1, 1, 8))
    e[..., 0] = 1
    np.testing.assert_allclose(rope(e, [1], 8, "norm", 10000.0)[0, 0, :2], [np.cos(1), np.sin(1)])


def test_attention_causal_and_grouped():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 4, 8))
    k = rng.standard_normal((5, 2, 8))
    v = rng.standard_normal((5, 2, 8))
    out = attention(q, k, v, np.array([0, 1, 4]), 0.5)
    # the first query sees position 0 only; heads 0,1 read kv head 0 and heads 2,3 kv head 1
    np.testing.assert_allclose(out[0, 1], v[0, 0])
    np.testing.assert_allclose(out[0, 3], v[0, 1])
    s = q[1, 2] @ k[:2, 1].T * 0.5
    p = np.exp(s - s.max())
    np.testing.assert_allclose(out[1, 2], (p / p.sum()) @ v[:2, 1])
