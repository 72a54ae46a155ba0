"""qwen35 / qwen35moe (hybrid Gated DeltaNet + gated attention, and the MTP block) on the OpenCL engine
against the numpy reference (tests/reference.py::HybridReferenceModel).

Tolerances as tests/test_engine.py: logits relative to their spread, 1e-2 for F32 and 5e-2 for quantized
weights; the tiny models have peaky logits, so greedy tokens must match exactly. The recurrent state adds
nothing new to the error budget: the delta rule is a contraction (tests/test_ops_delta_net.py).
"""

import numpy as np
import pytest

from nextn.cl.runtime import Runtime
from nextn.runner import ModelRunner
from nextn.devtools.tiny import make_tiny
from reference import ReferenceModel

ARCHS = ("qwen35", "qwen35moe")
TYPES = ("F32", "Q8_0", "Q4_K")
N_GREEDY = 64
PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11, 8, 140, 77]


def tolerance(qtype: str) -> float:
    return 1e-2 if qtype == "F32" else 5e-2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny35")
    cache = {}

    def get(arch, qtype, mtp=True, **kw):
        key = (arch, qtype, mtp, tuple(sorted(kw.items())))
        if key not in cache:
            # every row length a multiple of 256, so the K-quants are legal for every matrix; 3 linear
            # layers then 1 full-attention layer
            cache[key] = make_tiny(d / f"{arch}-{qtype}-{mtp}-{len(cache)}.gguf", arch=arch, qtype=qtype, seed=3,
                                   n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64, ssm_d_state=64,
                                   ssm_n_group=2, ssm_dt_rank=4, n_expert=8, n_expert_used=2, n_ff_exp=256,
                                   n_ff_shexp=256, mtp=mtp, **kw)
        return cache[key]

    return get


def spread_error(got, want):
    return float((np.abs(got - want) / want.std(axis=-1, keepdims=True)).max())


def engine_greedy(runner, seq, prompt, n):
    top, _ = runner.eval(seq, prompt, 0, want_logits=False)
    got, token, pos = [], int(top[-1]), len(prompt)
    for _ in range(n):
        got.append(token)
        t, _ = runner.eval(seq, [token], pos, want_logits=False)
        token, pos = int(t[-1]), pos + 1
    return got


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", TYPES)
def test_logits_and_greedy_match_reference(rt, models, arch, qtype):
    path = models(arch, qtype)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ref.forward(PROMPT, 0)
    assert spread_error(logits, want) < tolerance(qtype)
    assert (top == want.argmax(axis=1)).all()

    expect = ref.greedy(PROMPT, N_GREEDY)
    assert len(set(expect)) > 10  # not trivially one repeated token
    assert engine_greedy(runner, 0, PROMPT, N_GREEDY) == expect


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_chunks_leave_the_same_state(rt, models, arch):
    """Chunks of 1, 7, 64 and the whole prompt: the next token's logits agree (the conv and delta-rule
    states carried across chunks, the chunked kernels over whole chunks)."""
    path = models(arch, "Q8_0")
    prompt = (PROMPT * 6)[:80]
    results = {}
    for n_batch in (1, 7, 64, 128):
        runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=n_batch)
        _, results[n_batch] = runner.eval(0, prompt, 0)
    want = results[128]
    for n_batch, got in results.items():
        np.testing.assert_allclose(got, want, atol=1e-3 * float(want.std()), err_msg=f"n_batch={n_batch}")
    ref = ReferenceModel(path).forward(prompt, 0)[-1:]
    assert spread_error(want, ref) < tolerance("Q8_0")


def test_snapshot_run_restore_rerun_is_identical(rt, models):
    path = models("qwen35", "Q8_0")
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32)
    runner.eval(0, PROMPT, 0, want_logits=False)
    runner.snapshot(0)

    def five():
        out, pos, token = [], len(PROMPT), 9
        for _ in range(5):
            t, lg = runner.eval(0, [token], pos)
            out.append(lg)
            token, pos = int(t[-1]), pos + 1
        return np.concatenate(out)

    first = five()
    runner.truncate(0, len(PROMPT))  # back to the snapshot
    assert runner.seq_length(0) == len(PROMPT)
    np.testing.assert_array_equal(five(), first)
    # continuing from an arbitrary earlier position is refused (a recurrent state cannot be cut back)
    with pytest.raises(ValueError, match="cannot continue from position 3"):
        runner.eval(0, [1], 3)
    # but from 0 it restarts with a zero state: same logits as a fresh runner
    _, again = runner.eval(0, PROMPT, 0)
    _, fresh = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32).eval(0, PROMPT, 0)
    np.testing.assert_array_equal(again, fresh)


@pytest.mark.parametrize("arch", ARCHS)
def test_sequences_mixed_in_one_batch(rt, models, arch):
    """Prompt chunks of two slots and a decode token of a third in one step: each reads and updates only
    its own recurrent state and KV."""
    path = models(arch, "F32")
    runner = ModelRunner(path, rt=rt, n_ctx=64, n_seq=3, n_batch=32)
    a, b, c = PROMPT[:6], PROMPT[2:11], PROMPT[5:9]
    runner.eval(2, c, 0, want_logits=False)
    ids = a + b + [31]
    pos = list(range(len(a))) + list(range(len(b))) + [len(c)]
    seq = [0] * len(a) + [1] * len(b) + [2]
    rows = [len(a) - 1, len(a) + len(b) - 1, len(ids) - 1]
    _, logits = runner.step(ids, np.asarray(pos, np.int32), seq, rows, want_logits=True)
    for got, tokens in zip(logits, (a, b, c + [31])):
        want = ReferenceModel(path).forward(tokens, 0)[-1]
        assert spread_error(got, want) < tolerance("F32")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("own_head", [False, True])
def test_mtp_block_matches_reference(rt, models, arch, own_head):
    """The MTP head over the prompt (each token paired with the previous position's hidden state, zeros
    at position 0), then one recursive draft fed its own hidden output."""
    path = models(arch, "Q8_0", mtp_own_head=own_head)
    ref = ReferenceModel(path)
    runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=True)
    n = len(PROMPT)
    runner.eval(0, PROMPT, 0, want_logits=False)
    ref.forward(PROMPT, 0)
    hidden = np.vstack([np.zeros((1, ref.n_embd)), ref.h_nextn[:-1]])
    want = ref.mtp_forward(hidden, PROMPT, 0)
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
    """Without MTP the block's weights, KV cache and buffers are not allocated: the device ledger shows the
    difference, and it equals what the memory plan counts for them."""
    path = models("qwen35", "Q8_0")
    used = {}
    for mtp in (False, True):
        rt = Runtime()
        runner = ModelRunner(path, rt=rt, n_ctx=160, n_batch=32, mtp=mtp)
        used[mtp] = sum(rt.allocated.values())
        plan = runner.memory
    assert used[True] > used[False]
    mtp_parts = plan.mtp_weights + plan.mtp_kv_cache + plan.mtp_activations
    assert used[True] - used[False] == mtp_parts
    assert used[True] <= plan.total


def test_mtp_refused_on_a_file_without_the_block(rt, models):
    from nextn.errors import ModelLoadError

    path = models("qwen35", "F32", mtp=False)
    with pytest.raises(ModelLoadError, match="has no MTP block"):
        ModelRunner(path, rt=rt, n_ctx=64, mtp=True)
    ModelRunner(path, rt=rt, n_ctx=64)  # the trunk alone loads


def test_mixed_types_within_a_layer(rt, models, tmp_path):
    """Q4_K_M files give attn_v / ffn_up / shared-expert tensors another type: unfused projections written
    side by side must agree with the reference too."""
    import gguf

    from gguf_edit import rewrite
    from nextn.gguf.quantize import quantize

    src = models("qwen35moe", "Q4_K")
    r = gguf.GGUFReader(src)
    repl = {}
    for t in r.tensors:
        if t.name.endswith(("attn_v.weight", "ffn_up_shexp.weight")):
            w = gguf.quants.dequantize(np.array(t.data), gguf.GGMLQuantizationType.Q4_K)
            repl[t.name] = (quantize(w.astype(np.float32), "Q6_K"), gguf.GGMLQuantizationType.Q6_K)
    path = rewrite(src, tmp_path / "mixed.gguf", replace=repl)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32)
    assert "blk.3.attn_qgkv.weight" not in runner.weights and "blk.3.attn_v.weight" in runner.weights
    top, logits = runner.eval(0, PROMPT, 0, all_logits=True)
    want = ReferenceModel(path).forward(PROMPT, 0)
    assert spread_error(logits, want) < tolerance("Q4_K")
    assert (top == want.argmax(axis=1)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_rollback_after_partial_accept_equals_plain_run(rt, models, arch):
    """A verify step over [last, d1..d4], then keeping 1..5 of its rows (rollback: restore the state saved
    before the step, replay the kept rows through the conv and delta rule only) leaves the state a plain
    run of the kept tokens leaves: the next token's logits agree."""
    path = models(arch, "Q8_0", mtp=False)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32, speculative=True)
    assert runner.memory.rollback > 0
    n, ids = len(PROMPT), [11, 9, 31, 77, 4]
    for keep in range(1, len(ids) + 1):
        runner.eval(0, PROMPT, 0, want_logits=False)
        runner.save_for_rollback(0)
        runner.step(ids, np.arange(n, n + len(ids), dtype=np.int32), [0] * len(ids), list(range(len(ids))))
        runner.rollback(0, list(range(len(ids))), keep)
        assert runner.seq_length(0) == n + keep
        _, got = runner.eval(0, [123], n + keep)
        _, want = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32).eval(0, PROMPT + ids[:keep] + [123], 0)
        np.testing.assert_allclose(got, want, atol=1e-4 * float(want.std()), err_msg=f"keep {keep}")


@pytest.mark.parametrize("sections", [[4, 4, 4, 4], [2, 2, 0, 0]])
def test_pairs_on_the_fourth_mrope_section_do_not_turn(rt, tmp_path, sections):
    """rope.dimension_sections that put rotated pairs on the fourth (e) section: at text positions [p, p, p, 0]
    those pairs see position 0 (ggml_rope_multi, interleaved), so they do not turn; llama.cpp runs such files
    and so does nextn (the reference rotates every pair by its own channel's position)."""
    from nextn.devtools.tiny import imrope_channels

    n_rot = 32 if sections[0] == 4 else 8
    assert 3 in imrope_channels(sections, n_rot)
    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", qtype="F32", seed=2, head_dim=64 if n_rot == 32 else 16,
                     n_rot=n_rot, rope_sections=sections)
    runner = ModelRunner(path, rt=rt, n_ctx=128, n_batch=32)
    top, logits = runner.eval(0, PROMPT * 2, 0, all_logits=True)
    want = ReferenceModel(path).forward(PROMPT * 2, 0)
    assert spread_error(logits, want) < tolerance("F32")
    assert (top == want.argmax(axis=1)).all()
