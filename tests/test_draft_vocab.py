"""FR-Spec's reduced draft vocabulary (spec/draft_vocab.py, `--spec-draft-vocab N`): which tokens it keeps,
the reduced MTP head's logits equal to the full head's on those rows, and greedy output unchanged with it
(the sampled distribution: tests/test_speculative.py)."""

import numpy as np
import pytest
from test_speculative import generate

from nextn import default_model
from nextn.devtools.tiny import make_tiny
from nextn.gguf.model_file import ModelFile
from nextn.runner import ModelRunner
from nextn.spec.draft_vocab import draft_vocab_ids
from nextn.spec.speculator import SpecConfig
from nextn.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_metadata(ModelFile(default_model.path()).meta)


def test_the_most_frequent_tokens_and_end_of_generation_are_kept(tok):
    n_vocab = len(tok.tokens)
    text = "def value(self):\n    return self.value\n" * 50 + "class"
    frequent = set(tok.encode("def value(self):\n    return self.value\n", add_special=False))
    n = len(frequent | set(tok.eot_ids))
    ids = draft_vocab_ids(tok, n_vocab, n, text)
    assert len(ids) == n and ids.dtype == np.int32 and (np.diff(ids) > 0).all()
    assert set(ids.tolist()) == frequent | set(tok.eot_ids)  # "class" (once) and unseen tokens left out
    ids = draft_vocab_ids(tok, n_vocab, n + 1, text)
    assert tok.encode("class", add_special=False)[0] in ids  # next: the token seen once, before unseen ones
    # the default sample (the standard library's docs and code): common tokens of both kinds
    ids = set(draft_vocab_ids(tok, n_vocab, 512).tolist())
    assert set(tok.encode(" the", add_special=False)) <= ids and set(tok.encode(" self", add_special=False)) <= ids
    for n in (0, n_vocab):
        with pytest.raises(ValueError, match="between 1 and"):
            draft_vocab_ids(tok, n_vocab, n, text)


@pytest.mark.parametrize("arch", ["qwen35", "glm4moe", "step35"])
def test_reduced_head_logits_are_the_full_heads_rows(tmp_path, arch):
    path = make_tiny(tmp_path / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=5, mtp=True)
    full = ModelRunner(path, n_ctx=64, n_batch=16, mtp=True, speculative=True)
    reduced = ModelRunner(path, n_ctx=64, n_batch=16, mtp=True, speculative=True, draft_vocab=100)
    assert reduced.memory.mtp_weights > full.memory.mtp_weights
    ids = reduced.draft_ids
    prompt = full.tokenizer.encode("one two three four five", True, False)
    n = len(prompt)
    got = []
    for r in (full, reduced):
        r.eval(0, prompt, 0)
        got.append(r.mtp_step(prompt, np.arange(n, dtype=np.int32), [0] * n, [-1] + list(range(n - 1)),
                              list(range(n)), want_logits=True))
    (_, lg_full), (top, lg) = got
    assert lg.shape == lg_full.shape
    assert np.array_equal(lg[:, ids].view(np.uint32), lg_full[:, ids].view(np.uint32))
    assert np.isneginf(np.delete(lg, ids, axis=1)).all()
    assert (top == ids[lg_full[:, ids].argmax(axis=1)]).all()


@pytest.mark.parametrize("arch", ["qwen35", "step35"])
def test_greedy_output_unchanged_with_a_reduced_draft_vocabulary(tmp_path, arch):
    path = make_tiny(tmp_path / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=5, mtp=True)
    runner = ModelRunner(path, n_ctx=256, n_seq=2, n_batch=32, mtp=True, speculative=True, draft_vocab=100)
    prompt = runner.tokenizer.encode("one two three four", True, False)
    plain, _ = generate(runner, None, prompt)
    for n_max in (1, 3):
        got, timings = generate(runner, SpecConfig(types=("draft-mtp",), n_max=n_max, adaptive=False), prompt)
        assert got == plain, f"n_max={n_max}"
        assert 0 < timings["draft_n_accepted"] <= timings["draft_n"]
