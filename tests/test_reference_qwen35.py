"""Tiny qwen35 / qwen35moe models (nextn.devtools.tiny) and their numpy reference forward (tests/reference.py):
the layout llama.cpp's loader expects, self-consistency of the reference (whole prompt vs token by token vs
chunks, rollback of the recurrent state), the MTP block, and peaky logits."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from nextn.gguf.metadata import read_metadata
from nextn.devtools.tiny import imrope_channels, main, make_tiny, rope_sections_default
from reference import HybridReferenceModel, ReferenceModel, rope, rope_multi, text_positions

PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11, 300]


def tensors(path):
    r = gguf.GGUFReader(str(path), "r")
    return {t.name: (tuple(int(n) for n in t.shape), QT(int(t.tensor_type))) for t in r.tensors}


def expected_tensors(arch, qt, n_vocab, mtp=False, own_head=False, n_embd=64, n_layer=4, n_head=4, n_head_kv=2,
                     head_dim=16, n_ff=128, d_conv=4, d_state=16, n_group=2, dt_rank=4, n_expert=8, n_ff_exp=32,
                     n_ff_shexp=32, interval=4):
    """GGUF ne order, as llama_model_qwen35{,moe}::load_arch_tensors creates them (src/models/qwen35*.cpp)."""
    key_dim, value_dim = d_state * n_group, d_state * dt_rank
    want = {"token_embd.weight": ((n_embd, n_vocab), qt), "output_norm.weight": ((n_embd,), QT.F32),
            "output.weight": ((n_embd, n_vocab), qt)}

    def full(b):
        return {
            b + "attn_q.weight": ((n_embd, n_head * head_dim * 2), qt),  # joint Q + gate
            b + "attn_k.weight": ((n_embd, n_head_kv * head_dim), qt),
            b + "attn_v.weight": ((n_embd, n_head_kv * head_dim), qt),
            b + "attn_output.weight": ((n_head * head_dim, n_embd), qt),
            b + "attn_q_norm.weight": ((head_dim,), QT.F32),
            b + "attn_k_norm.weight": ((head_dim,), QT.F32),
        }

    def ffn(b):
        if arch == "qwen35":
            return {b + "ffn_gate.weight": ((n_embd, n_ff), qt), b + "ffn_up.weight": ((n_embd, n_ff), qt),
                    b + "ffn_down.weight": ((n_ff, n_embd), qt)}
        return {
            b + "ffn_gate_inp.weight": ((n_embd, n_expert), QT.F32),
            b + "ffn_gate_exps.weight": ((n_embd, n_ff_exp, n_expert), qt),
            b + "ffn_up_exps.weight": ((n_embd, n_ff_exp, n_expert), qt),
            b + "ffn_down_exps.weight": ((n_ff_exp, n_embd, n_expert), qt),
            b + "ffn_gate_inp_shexp.weight": ((n_embd,), QT.F32),
            b + "ffn_gate_shexp.weight": ((n_embd, n_ff_shexp), qt),
            b + "ffn_up_shexp.weight": ((n_embd, n_ff_shexp), qt),
            b + "ffn_down_shexp.weight": ((n_ff_shexp, n_embd), qt),
        }

    for il in range(n_layer):
        b = f"blk.{il}."
        want |= {b + "attn_norm.weight": ((n_embd,), QT.F32), b + "post_attention_norm.weight": ((n_embd,), QT.F32)}
        if (il + 1) % interval:
            want |= {
                b + "attn_qkv.weight": ((n_embd, key_dim * 2 + value_dim), qt),
                b + "attn_gate.weight": ((n_embd, value_dim), qt),
                b + "ssm_conv1d.weight": ((d_conv, key_dim * 2 + value_dim), QT.F32),
                b + "ssm_dt.bias": ((dt_rank,), QT.F32),
                b + "ssm_a": ((dt_rank,), QT.F32),
                b + "ssm_beta.weight": ((n_embd, dt_rank), qt),
                b + "ssm_alpha.weight": ((n_embd, dt_rank), qt),
                b + "ssm_norm.weight": ((d_state,), QT.F32),
                b + "ssm_out.weight": ((value_dim, n_embd), qt),
            }
        else:
            want |= full(b)
        want |= ffn(b)
    if mtp:
        b = f"blk.{n_layer}."
        want |= {b + "attn_norm.weight": ((n_embd,), QT.F32), b + "post_attention_norm.weight": ((n_embd,), QT.F32)}
        want |= full(b) | ffn(b)
        want |= {
            b + "nextn.eh_proj.weight": ((2 * n_embd, n_embd), qt),
            b + "nextn.enorm.weight": ((n_embd,), QT.F32),
            b + "nextn.hnorm.weight": ((n_embd,), QT.F32),
            b + "nextn.shared_head_norm.weight": ((n_embd,), QT.F32),
        }
        if own_head:
            want |= {b + "nextn.embed_tokens.weight": ((n_embd, n_vocab), qt),
                     b + "nextn.shared_head_head.weight": ((n_embd, n_vocab), qt)}
    return want


# ---------------------------------------------------------------------------------------------- layout

# MODEL_TENSORS[MODEL_ARCH.QWEN35 / QWEN35MOE] of llama.cpp's gguf-py/gguf/constants.py, as TENSOR_NAMES spells
# them (the installed gguf-py 0.19 predates the nextn entries, so the lists are written out here)
_COMMON = {
    "token_embd", "output_norm", "output", "blk.{bid}.attn_norm", "blk.{bid}.attn_q", "blk.{bid}.attn_q_norm",
    "blk.{bid}.attn_k", "blk.{bid}.attn_k_norm", "blk.{bid}.attn_v", "blk.{bid}.attn_output",
    "blk.{bid}.post_attention_norm", "blk.{bid}.attn_gate", "blk.{bid}.attn_qkv", "blk.{bid}.ssm_a",
    "blk.{bid}.ssm_conv1d", "blk.{bid}.ssm_dt", "blk.{bid}.ssm_norm", "blk.{bid}.ssm_beta", "blk.{bid}.ssm_alpha",
    "blk.{bid}.ssm_out", "blk.{bid}.nextn.eh_proj", "blk.{bid}.nextn.embed_tokens", "blk.{bid}.nextn.enorm",
    "blk.{bid}.nextn.hnorm", "blk.{bid}.nextn.shared_head_head", "blk.{bid}.nextn.shared_head_norm",
}
LLAMA_CPP_TENSORS = {
    "qwen35": _COMMON | {"cls.output", "blk.{bid}.ffn_gate", "blk.{bid}.ffn_down", "blk.{bid}.ffn_up"},
    "qwen35moe": _COMMON | {
        "blk.{bid}.ffn_gate_inp", "blk.{bid}.ffn_gate_inp_shexp", "blk.{bid}.ffn_up_shexp",
        "blk.{bid}.ffn_down_shexp", "blk.{bid}.ffn_gate_shexp", "blk.{bid}.ffn_down_exps", "blk.{bid}.ffn_up_exps",
        "blk.{bid}.ffn_gate_exps", "blk.{bid}.ffn_gate_up_exps",
    },
}


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
@pytest.mark.parametrize("mtp", [False, True])
def test_layout_matches_llama_cpp(tmp_path, arch, mtp):
    path = make_tiny(tmp_path / "m.gguf", arch=arch, qtype="Q8_0", mtp=mtp)
    meta = read_metadata(str(path))
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    assert tensors(path) == expected_tensors(arch, QT.Q8_0, n_vocab, mtp=mtp)

    # every name is one llama.cpp's gguf-py lists for the arch (what convert_hf_to_gguf.py can write)
    allowed = LLAMA_CPP_TENSORS[arch]
    for name in tensors(path):
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        generic = ".".join("{bid}" if p.isdecimal() else p for p in base.split("."))
        assert generic in allowed, name

    a = arch
    n_block = 5 if mtp else 4
    assert meta["general.architecture"] == arch
    assert meta[f"{a}.block_count"] == n_block
    assert meta[f"{a}.embedding_length"] == 64 and meta[f"{a}.feed_forward_length"] == 128
    assert meta[f"{a}.attention.head_count"] == 4 and meta[f"{a}.attention.head_count_kv"] == 2
    assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == 16
    assert meta[f"{a}.rope.freq_base"] == 1e7 and meta[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta[f"{a}.rope.dimension_count"] == 8 and list(meta[f"{a}.rope.dimension_sections"]) == [2, 1, 1, 0]
    assert meta[f"{a}.ssm.conv_kernel"] == 4 and meta[f"{a}.ssm.state_size"] == 16
    assert meta[f"{a}.ssm.group_count"] == 2 and meta[f"{a}.ssm.time_step_rank"] == 4
    assert meta[f"{a}.ssm.inner_size"] == 64 and meta[f"{a}.full_attention_interval"] == 4
    # Qwen3NextModel.set_gguf_parameters: layer_types, padded with False for the MTP block
    assert list(meta[f"{a}.attention.recurrent_layers"]) == [True, True, True, False] + [False] * mtp
    if mtp:
        assert meta[f"{a}.nextn_predict_layers"] == 1
    else:
        assert f"{a}.nextn_predict_layers" not in meta
    if arch == "qwen35moe":
        assert meta[f"{a}.expert_count"] == 8 and meta[f"{a}.expert_used_count"] == 2
        assert meta[f"{a}.expert_feed_forward_length"] == 32
        assert meta[f"{a}.expert_shared_feed_forward_length"] == 32
    else:
        assert not any(k.startswith(f"{a}.expert") for k in meta)


def test_optional_mtp_head_tensors(tmp_path):
    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", mtp=True, mtp_own_head=True, tied=True)
    n_vocab = len(read_metadata(str(path))["tokenizer.ggml.tokens"])
    want = expected_tensors("qwen35", QT.F32, n_vocab, mtp=True, own_head=True)
    del want["output.weight"]  # tied
    assert tensors(path) == want


def test_interval_without_recurrent_array(tmp_path):
    # llama.cpp falls back to full_attention_interval when attention.recurrent_layers is absent
    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", n_layer=6, full_attention_interval=3,
                     recurrent_layers_key=False)
    meta = read_metadata(str(path))
    assert "qwen35.attention.recurrent_layers" not in meta and meta["qwen35.full_attention_interval"] == 3
    ref = ReferenceModel(path)
    assert ref.is_recr == [True, True, False, True, True, False]
    assert "blk.2.attn_q.weight" in ref.w and "blk.3.attn_qkv.weight" in ref.w


def test_bad_hybrid_arguments(tmp_path):
    with pytest.raises(ValueError, match="MTP block exists for qwen35"):
        make_tiny(tmp_path / "m.gguf", arch="qwen3", mtp=True)
    with pytest.raises(ValueError, match="multiple of ssm_n_group"):
        make_tiny(tmp_path / "m.gguf", arch="qwen35", ssm_n_group=3)
    with pytest.raises(ValueError, match="n_ff_exp = 32 is not a multiple"):
        make_tiny(tmp_path / "m.gguf", arch="qwen35moe", qtype="Q4_K", n_embd=256, n_head=2, head_dim=128,
                  n_ff=256, ssm_d_state=64)


def test_q4_k_model(tmp_path):
    kw = {"n_embd": 256, "n_head": 2, "n_head_kv": 1, "head_dim": 128, "n_ff": 256, "ssm_d_state": 64,
          "n_ff_exp": 256, "n_ff_shexp": 256, "n_expert": 4}
    path = make_tiny(tmp_path / "q.gguf", arch="qwen35moe", qtype="Q4_K", mtp=True, **kw)
    t = tensors(path)
    assert t["blk.0.ffn_down_exps.weight"] == ((256, 256, 4), QT.Q4_K)
    assert t["blk.0.ssm_conv1d.weight"][1] == QT.F32 and t["blk.4.nextn.eh_proj.weight"][1] == QT.Q4_K
    ref = ReferenceModel(path)
    assert ref.forward(PROMPT[:3]).shape == (3, ref.n_vocab)


def test_main_mtp(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main([str(out), "--arch", "qwen35moe", "--mtp", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = read_metadata(str(out))
    assert meta["qwen35moe.block_count"] == 5 and meta["qwen35moe.nextn_predict_layers"] == 1


# ------------------------------------------------------------------------------------------- reference


@pytest.fixture(scope="module", params=["qwen35", "qwen35moe"])
def model_path(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ref35") / f"{request.param}.gguf", arch=request.param, seed=5,
                     mtp=True)


def test_is_hybrid(model_path):
    ref = ReferenceModel(model_path)
    assert isinstance(ref, HybridReferenceModel)
    assert ref.n_layer == 4 and ref.n_layer_all == 5 and ref.n_nextn == 1
    assert ref.is_recr == [True, True, True, False]
    assert ref.conv_state(0).shape == (3, 2 * 32 + 64) and ref.delta_state(0).shape == (4, 16, 16)


def test_one_by_one_equals_batch(model_path):
    ref = ReferenceModel(model_path)
    full = ref.forward(PROMPT)
    conv, delta = ref.conv_state(1).copy(), ref.delta_state(1).copy()
    ref.reset()
    steps = np.concatenate([ref.forward([t], i) for i, t in enumerate(PROMPT)])
    np.testing.assert_allclose(steps, full, atol=1e-9)
    np.testing.assert_allclose(ref.conv_state(1), conv, atol=1e-12)
    np.testing.assert_allclose(ref.delta_state(1), delta, atol=1e-12)


def test_rollback_restores_recurrent_state(model_path):
    ref = ReferenceModel(model_path)
    full = ref.forward(PROMPT)
    ref.forward([1, 2, 3], len(PROMPT))  # speculative tokens, then rejected
    again = ref.forward(PROMPT[8:], 8)  # the conv / delta states go back to those after position 7
    np.testing.assert_allclose(again, full[8:], atol=1e-9)
    with pytest.raises(ValueError, match="only 12 positions are cached"):
        ref.forward([1], 13)


def test_state_carries_context(model_path):
    # the last token's logits depend on earlier tokens through the linear layers' state too: with the
    # full-attention layer's cache emptied, the recurrent state alone still moves them
    ref = ReferenceModel(model_path)
    a = ref.forward([1, 2, 3, 200])[-1]
    b = ref.forward([9, 8, 7, 6, 5, 200])[-1]
    assert np.abs(a - b).max() > 0.3
    assert np.abs(ref.delta_state(0)).max() > 0.01


def test_greedy_chains_forward(model_path):
    ref = ReferenceModel(model_path)
    out = ref.greedy(PROMPT, 6)
    ref.reset()
    logits = ref.forward(PROMPT + out[:-1])
    assert [int(i) for i in logits[len(PROMPT) - 1 :].argmax(axis=1)] == out


def test_trace_names(model_path):
    ref = ReferenceModel(model_path)
    ref.trace = {}
    ref.forward(PROMPT[:3])
    assert {"attn_norm-0", "linear_attn_qkv_mixed-0", "conv_output_silu-0", "linear_attn_out-0", "Qcur-3",
            "attn_pregate-3", "attn_residual-3", "attn_post_norm-3", "ffn_out-3", "l_out-3", "h_nextn",
            "result_output"} <= set(ref.trace)
    assert ref.trace["Qcur-3"].shape == (3, ref.n_head, ref.n_embd_head_k)
    np.testing.assert_array_equal(ref.trace["h_nextn"], ref.h_nextn)


# ------------------------------------------------------------------------------------------------- MTP


def mtp_prompt_drafts(ref):
    """Drafts of the MTP block over the prompt, fed as llama.cpp's catch-up batch feeds it: the token at
    position p with the trunk's h_nextn of position p - 1 (zeros for p = 0)."""
    ref.reset()
    trunk = ref.forward(PROMPT)
    hidden = np.vstack([np.zeros(ref.n_embd), ref.h_nextn[:-1]])
    return trunk, ref.mtp_forward(hidden, PROMPT, 0)


def test_mtp_forward_deterministic_and_chained(model_path):
    ref = ReferenceModel(model_path)
    trunk, drafts = mtp_prompt_drafts(ref)
    assert drafts.shape == (len(PROMPT), ref.n_vocab) and ref.mtp_n_past == len(PROMPT)
    assert ref.mtp_h_nextn.shape == (len(PROMPT), ref.n_embd)
    _, again = mtp_prompt_drafts(ReferenceModel(model_path))
    np.testing.assert_array_equal(again, drafts)

    # one position at a time through the MTP KV cache gives the same drafts; so does a rollback
    hidden = np.vstack([np.zeros(ref.n_embd), ref.h_nextn[:-1]])
    steps = np.concatenate([ref.mtp_forward(hidden[i], PROMPT[i], i) for i in range(len(PROMPT))])
    np.testing.assert_allclose(steps, drafts, atol=1e-9)
    np.testing.assert_allclose(ref.mtp_forward(hidden[5:], PROMPT[5:], 5), drafts[5:], atol=1e-9)
    with pytest.raises(ValueError, match="MTP positions are cached"):
        ref.mtp_forward(hidden[0], PROMPT[0], len(PROMPT) + 1)
    with pytest.raises(ValueError, match="hidden must be"):
        ref.mtp_forward(hidden[:2], PROMPT[:3], 0)


def test_mtp_drafts_are_peaky_and_follow_the_trunk(model_path):
    ref = ReferenceModel(model_path)
    trunk, drafts = mtp_prompt_drafts(ref)
    # the draft at position p guesses token p + 1, which the trunk predicts from position p
    top2 = np.sort(drafts, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2.0
    assert (drafts.argmax(axis=1) == trunk.argmax(axis=1)).mean() >= 0.9
    # the trunk's hidden state matters: a zero hidden state moves the draft logits by ~1
    other = ref.mtp_forward(np.zeros((len(PROMPT), ref.n_embd)), PROMPT, 0)
    assert np.abs(other - drafts).max() > 0.3


def test_mtp_own_head_is_used(tmp_path):
    kw = {"arch": "qwen35", "seed": 2, "mtp": True}
    shared = ReferenceModel(make_tiny(tmp_path / "a.gguf", **kw))
    own = ReferenceModel(make_tiny(tmp_path / "b.gguf", mtp_own_head=True, **kw))
    np.testing.assert_array_equal(shared.forward(PROMPT), own.forward(PROMPT))  # same trunk
    h = np.vstack([np.zeros(own.n_embd), own.h_nextn[:-1]])
    a, b = shared.mtp_forward(h, PROMPT, 0), own.mtp_forward(h, PROMPT, 0)
    assert np.abs(a - b).max() > 0.3  # nextn.embed_tokens / shared_head_head are read
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.9


def test_no_mtp_block(tmp_path):
    ref = ReferenceModel(make_tiny(tmp_path / "m.gguf", arch="qwen35moe"))
    assert ref.n_nextn == 0 and ref.n_layer == 4 and ref.mtp_n_past == 0
    ref.forward(PROMPT[:2])
    with pytest.raises(ValueError, match="no MTP block"):
        ref.mtp_forward(ref.h_nextn, PROMPT[:2], 0)


# ---------------------------------------------------------------------------------------- peaky logits


@pytest.mark.parametrize("arch,tied", [("qwen35", False), ("qwen35", True), ("qwen35moe", False)])
def test_greedy_is_stable_under_noise(tmp_path, arch, tied):
    prompt = [5, 17, 99, 3, 42, 250, 7, 61]
    for seed in range(2):
        ref = ReferenceModel(make_tiny(tmp_path / f"{seed}.gguf", arch=arch, seed=seed, tied=tied))
        out = ref.greedy(prompt, 64)
        ref.reset()
        logits = ref.forward(prompt + out[:-1])[len(prompt) - 1 :]
        top2 = np.sort(logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        assert margin.min() > 2.0, (seed, float(margin.min()))
        noise = np.random.default_rng(seed).uniform(-1e-2, 1e-2, logits.shape)
        assert np.array_equal((logits + noise).argmax(axis=1), logits.argmax(axis=1))


# ---------------------------------------------------------------------------------------------- pieces


def test_rope_multi_text_positions_are_neox():
    # every rotated pair on t/h/w: at text positions [p, p, p, 0] M-RoPE is NEOX RoPE at p
    x = np.random.default_rng(3).standard_normal((3, 2, 16))
    pos = np.array([0, 5, 77])
    for n_rot in (8, 12, 16):
        sections = rope_sections_default(n_rot)
        assert 3 not in imrope_channels(sections, n_rot)
        np.testing.assert_allclose(rope_multi(x, text_positions(pos), n_rot, sections, 1e7),
                                   rope(x, pos, n_rot, "neox", 1e7), atol=1e-12)
    # Qwen3.5's own sections, n_rot 64 of head_dim 256: also all on t/h/w
    assert 3 not in imrope_channels([11, 11, 10, 0], 64)
    # a pair left on the extra channel rotates with position 0 (llama.cpp's text position there): unrotated
    y = rope_multi(x, text_positions(pos), 8, [2, 2, 0, 0], 1e4)
    assert imrope_channels([2, 2, 0, 0], 8) == [0, 1, 3, 0]
    np.testing.assert_array_equal(y[..., [2, 6]], x[..., [2, 6]])
