"""glm4moe (GLM-4.5/4.6/4.7: q/k/v biases, partial NeoX RoPE, a leading dense layer then sigmoid-routed experts
with a selection bias and an ungated shared expert, and the MTP block) on the OpenCL engine against the numpy
reference (tests/reference.py::Glm4MoeReferenceModel).

Tolerances as tests/test_engine.py: logits relative to their spread, 1e-2 for F32 and 5e-2 for quantized
weights; the tiny models have peaky logits, so greedy tokens must match exactly.
"""

import numpy as np
import pytest

from nextn.cl.runtime import Runtime
from nextn.errors import ModelLoadError
from nextn.runner import ModelRunner
from nextn.devtools.tiny import make_tiny
from reference import ReferenceModel
from test_engine_qwen35 import PROMPT, engine_greedy, spread_error, tolerance

TYPES = ("F32", "Q8_0", "Q4_K")
N_GREEDY = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm")
    cache = {}

    def get(qtype, mtp=True, **kw):
        key = (qtype, mtp, tuple(sorted(kw.items())))
        if key not in cache:
            # every row length a multiple of 256, so the K-quants are legal for every matrix
            cache[key] = make_tiny(d / f"glm-{qtype}-{mtp}-{len(cache)}.gguf", arch="glm4moe", qtype=qtype, seed=3,
                                   n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64, n_expert=8,
                                   n_expert_used=2, n_ff_exp=256, mtp=mtp, **kw)
        return cache[key]

    return get


@pytest.mark.parametrize("qtype", TYPES)
def test_logits_and_greedy_match_reference(rt, models, qtype):
    path = models(qtype)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ref.forward(PROMPT, 0)
    assert spread_error(logits, want) < tolerance(qtype)
    assert (top == want.argmax(axis=1)).all()
    expect = ref.greedy(PROMPT, N_GREEDY)
    assert len(set(expect)) > 10  # not trivially one repeated token
    assert engine_greedy(runner, 0, PROMPT, N_GREEDY) == expect


@pytest.mark.parametrize("variant", [dict(qk_norm=True), dict(qkv_bias=False), dict(n_dense_lead=0),
                                     dict(n_expert_shared=0, tied=True)])
def test_variants_match_reference(rt, models, variant):
    """GLM-4.5 355B's q/k norms, a file without q/k/v biases, no dense layer, no shared expert (and a tied
    head): each optional part is read from the file and computed as llama.cpp does."""
    path = models("Q8_0", **variant)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ReferenceModel(path).forward(PROMPT, 0)
    assert spread_error(logits, want) < tolerance("Q8_0")
    assert (top == want.argmax(axis=1)).all()


def test_prompt_chunks_and_mixed_sequences(rt, models):
    """Chunks of 1, 7 and the whole prompt leave the same state; prompt chunks of two slots and a decode token
    of a third in one step each see only their own KV."""
    path = models("Q8_0")
    results = {}
    for n_batch in (1, 7, 64):
        _, results[n_batch] = ModelRunner(path, rt=rt, n_ctx=160, n_batch=n_batch).eval(0, PROMPT * 3, 0)
    for n_batch, got in results.items():
        np.testing.assert_allclose(got, results[64], atol=1e-3 * float(results[64].std()), err_msg=str(n_batch))
    runner = ModelRunner(path, rt=rt, n_ctx=64, n_seq=3, n_batch=32)
    a, b, c = PROMPT[:6], PROMPT[2:11], PROMPT[5:9]
    runner.eval(2, c, 0, want_logits=False)
    ids = a + b + [31]
    pos = list(range(len(a))) + list(range(len(b))) + [len(c)]
    rows = [len(a) - 1, len(a) + len(b) - 1, len(ids) - 1]
    _, logits = runner.step(ids, np.asarray(pos, np.int32), [0] * len(a) + [1] * len(b) + [2], rows, True)
    for got, tokens in zip(logits, (a, b, c + [31])):
        assert spread_error(got, ReferenceModel(path).forward(tokens, 0)[-1]) < tolerance("Q8_0")


@pytest.mark.parametrize("own_head", [False, True])
def test_mtp_block_matches_reference(rt, models, own_head):
    """The MTP block over the prompt (each token with the previous position's hidden state, zeros at 0),
    then one draft fed its own hidden output."""
    path = models("Q8_0", mtp_own_head=own_head)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=True)
    n = len(PROMPT)
    runner.eval(0, PROMPT, 0, want_logits=False)
    ref.forward(PROMPT, 0)
    want = ref.mtp_forward(np.vstack([np.zeros((1, ref.n_embd)), ref.h_nextn[:-1]]), PROMPT, 0)
    top, got = runner.mtp_step(PROMPT, np.arange(n, dtype=np.int32), [0] * n, [-1] + list(range(n - 1)),
                               list(range(n)), want_logits=True)
    assert spread_error(got, want) < tolerance("Q8_0")
    assert (top == want.argmax(axis=1)).all()
    assert runner.mtp_length(0) == n
    draft = int(top[-1])
    want2 = ref.mtp_forward(ref.mtp_h_nextn[-1], [draft], n)
    top2, got2 = runner.mtp_step([draft], np.array([n], np.int32), [0], [n - 1], [0], source="mtp",
                                 want_logits=True)
    assert spread_error(got2, want2) < tolerance("Q8_0")
    assert int(top2[0]) == int(want2.argmax())


def test_mtp_memory_only_when_asked(models):
    path = models("Q8_0")
    used = {}
    for mtp in (False, True):
        rt = Runtime()
        runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=mtp)
        used[mtp] = sum(rt.allocated.values())
        plan = runner.memory
    assert used[True] - used[False] == plan.mtp_weights + plan.mtp_kv_cache + plan.mtp_activations > 0
    assert used[True] <= plan.total


def test_trunk_only_file_runs_and_refuses_mtp_clearly(rt, models, tmp_path):
    """A file whose metadata declares the MTP block (nextn_predict_layers = 1) without its tensors, as
    llama.cpp's converter writes with --no-mtp-style exports: the trunk runs, draft-mtp is refused with a
    message saying what is missing, and `nextn inspect` says so."""
    from gguf_edit import rewrite
    from nextn.model_info import describe

    src = models("Q8_0")
    import gguf

    mtp_names = [t.name for t in gguf.GGUFReader(src).tensors if t.name.startswith("blk.3.")]
    path = rewrite(src, tmp_path / "trunk.gguf", drop=mtp_names)
    _, got = ModelRunner(path, rt=rt, n_ctx=64).eval(0, PROMPT, 0)
    _, want = ModelRunner(src, rt=rt, n_ctx=64).eval(0, PROMPT, 0)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ModelLoadError, match="nextn_predict_layers declares an MTP block but the file has no"):
        ModelRunner(path, rt=rt, n_ctx=64, mtp=True)
    assert "tensors are not in the file" in describe(path)


@pytest.mark.parametrize("key,value,match", [
    ("glm4moe.expert_gating_func", 3, "expert_gating_func"),
    ("glm4moe.leading_dense_block_count", 9, "leading_dense_block_count"),
    ("glm4moe.rope.dimension_count", 7, "rope.dimension_count"),
    ("glm4moe.expert_used_count", 99, "expert_used_count"),
    ("glm4moe.nextn_predict_layers", 2, "nextn_predict_layers"),
])
def test_bad_metadata_is_refused_naming_the_key(rt, models, tmp_path, key, value, match):
    import gguf

    from gguf_edit import rewrite

    path = rewrite(models("F32"), tmp_path / "bad.gguf", set_keys={key: (value, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ModelLoadError, match=match):
        ModelRunner(path, rt=rt, n_ctx=64)
