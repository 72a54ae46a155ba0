"""nextn.devtools.tiny: the converter's tensor names, shapes, types and metadata keys; determinism; the byte
vocabulary; copied vocabularies; peaky logits (greedy stable under noise); the command line."""

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from reference import ReferenceModel

from nextn.devtools.tiny import CHATML_TEMPLATE, SPECIALS, learn_merges, main, make_tiny
from nextn.gguf.metadata import metadata_dict, read_metadata
from nextn.gguf.quantize import SUPPORTED

VOCAB = Path(__file__).parent / "data" / "vocab"


def tensors(path):
    r = gguf.GGUFReader(str(path), "r")
    return {t.name: (tuple(int(n) for n in t.shape), QT(int(t.tensor_type))) for t in r.tensors}


def expected_tensors(arch, qt, tied, n_vocab, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                     n_ff=128):
    """GGUF ne order (reverse of numpy): what llama.cpp's load_arch_tensors asks for."""
    want = {"token_embd.weight": ((n_embd, n_vocab), qt), "output_norm.weight": ((n_embd,), QT.F32)}
    if not tied:
        want["output.weight"] = ((n_embd, n_vocab), qt)
    for i in range(n_layer):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": ((n_embd,), QT.F32),
            b + "attn_q.weight": ((n_embd, n_head * head_dim), qt),
            b + "attn_k.weight": ((n_embd, n_head_kv * head_dim), qt),
            b + "attn_v.weight": ((n_embd, n_head_kv * head_dim), qt),
            b + "attn_output.weight": ((n_head * head_dim, n_embd), qt),
            b + "ffn_norm.weight": ((n_embd,), QT.F32),
            b + "ffn_gate.weight": ((n_embd, n_ff), qt),
            b + "ffn_up.weight": ((n_embd, n_ff), qt),
            b + "ffn_down.weight": ((n_ff, n_embd), qt),
        }
        if arch == "qwen3":
            want |= {
                b + "attn_q_norm.weight": ((head_dim,), QT.F32),
                b + "attn_k_norm.weight": ((head_dim,), QT.F32),
            }
    return want


TOKENIZER_KEYS = {
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
}


@pytest.mark.parametrize("arch,tied", [("qwen3", None), ("qwen3", False), ("llama", None), ("llama", True)])
def test_layout_matches_converter(tmp_path, arch, tied):
    path = make_tiny(tmp_path / "m.gguf", arch=arch, qtype="Q8_0", tied=tied)
    meta = read_metadata(str(path))
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    is_tied = {"qwen3": True, "llama": False}[arch] if tied is None else tied
    assert tensors(path) == expected_tensors(arch, QT.Q8_0, is_tied, n_vocab)

    keys = {"general.architecture", "general.type", "general.name", "general.file_type",
            "general.quantization_version"} | TOKENIZER_KEYS
    keys |= {
        f"{arch}.{k}"
        for k in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                  "attention.layer_norm_rms_epsilon")
    }
    if arch == "qwen3":
        keys |= {"qwen3.attention.key_length", "qwen3.attention.value_length"}
    else:
        keys |= {"llama.vocab_size", "llama.rope.dimension_count"}
    assert set(meta) == keys
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta[f"{arch}.embedding_length"] == 64 and meta[f"{arch}.block_count"] == 2
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.context_length"] == 256 and meta[f"{arch}.feed_forward_length"] == 128
    assert meta[f"{arch}.rope.freq_base"] == {"qwen3": 1e6, "llama": 5e5}[arch]
    if arch == "llama":
        assert meta["llama.vocab_size"] == n_vocab and meta["llama.rope.dimension_count"] == 16


def test_llama_head_dim_other_than_n_embd_over_n_head(tmp_path):
    path = make_tiny(tmp_path / "m.gguf", arch="llama", n_embd=64, n_head=4, head_dim=32)
    meta = read_metadata(str(path))
    assert meta["llama.attention.key_length"] == 32 and meta["llama.rope.dimension_count"] == 32
    assert tensors(path)["blk.0.attn_q.weight"][0] == (64, 128)


@pytest.mark.parametrize("qtype", [t.name for t in SUPPORTED if t.name != "F32"])
def test_types_share_the_float_weights(tmp_path, qtype):
    # one generator per tensor: a file of another type holds the same weights, quantized
    kw = {"arch": "qwen3", "seed": 3, "n_embd": 256, "n_ff": 256, "n_head": 2, "n_head_kv": 1,
          "head_dim": 128, "n_layer": 1}
    ref = ReferenceModel(make_tiny(tmp_path / "f32.gguf", qtype="F32", **kw))
    q = ReferenceModel(make_tiny(tmp_path / "q.gguf", qtype=qtype, **kw))
    assert tensors(q.path)["blk.0.ffn_up.weight"][1] == QT[qtype]
    assert tensors(q.path)["blk.0.ffn_norm.weight"][1] == QT.F32
    # relative RMS error of a type's quantization of unit-Gaussian rows (4 bits: ~0.1, 5 bits: ~0.05, ...)
    bound = {"F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q4_0": 0.12, "Q4_1": 0.12, "Q5_0": 0.06, "Q5_1": 0.06,
             "IQ4_NL": 0.12, "IQ4_XS": 0.12, "Q2_K": 0.4, "Q3_K": 0.2, "Q4_K": 0.1, "Q5_K": 0.05,
             "Q6_K": 0.03}[qtype]
    for name, w in ref.w.items():
        err = np.sqrt(np.mean((q.w[name] - w) ** 2)) / np.sqrt(np.mean(w**2))
        assert err < bound, (name, err)


def test_deterministic_from_seed(tmp_path):
    a = make_tiny(tmp_path / "a.gguf", seed=4).read_bytes()
    b = make_tiny(tmp_path / "b.gguf", seed=4).read_bytes()
    c = make_tiny(tmp_path / "c.gguf", seed=5).read_bytes()
    assert a == b and a != c


def test_byte_vocabulary(tmp_path):
    from nextn.tokenizer import BYTE_TO_UNICODE, Tokenizer

    meta = read_metadata(str(make_tiny(tmp_path / "m.gguf")))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = meta["tokenizer.ggml.merges"]
    assert tokens[:256] == [BYTE_TO_UNICODE[b] for b in range(256)]  # token id == byte value
    assert 100 <= len(merges) <= 256 and len(tokens) == 256 + len(merges) + 3
    have = set()
    for i, m in enumerate(merges):  # each merge joins two existing tokens into the next new one
        a, b = m.split(" ")
        assert a in tokens[: 256 + i] and b in tokens[: 256 + i]
        assert tokens[256 + i] == a + b and a + b not in have
        have.add(a + b)
    assert tuple(tokens[-3:]) == SPECIALS and types[-3:] == [3, 3, 3] and set(types[:-3]) == {1}
    eot = len(tokens) - 3
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.bos_token_id"] == eot
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"

    tok = Tokenizer.from_metadata(meta)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_special=False)
    assert len(ids) < 0.6 * len(text.encode())  # the merges compress English
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>", add_special=False, parse_special=True) == [eot + 1]
    assert tok.is_eog(eot + 2)  # <|im_end|>


def test_chat_template_is_chatml():
    import jinja2

    text = jinja2.Environment().from_string(CHATML_TEMPLATE).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_learned_merges_are_deterministic():
    text = "the cat, the hat; the bat and then the end."
    assert learn_merges(text, 5) == learn_merges(text, 5)
    # "h e" is in all five the/then (5), "Ġ t" in four: most frequent first, then "t he", "Ġ the"
    assert learn_merges(text, 5)[:3] == ["h e", "t he", "Ġ the"]


def test_copied_vocabulary(tmp_path):
    src = VOCAB / "ggml-vocab-llama-spm.gguf"
    path = make_tiny(tmp_path / "m.gguf", arch="llama", vocab=str(src))
    r_src, r = gguf.GGUFReader(str(src), "r"), gguf.GGUFReader(str(path), "r")
    src_meta, meta = metadata_dict(r_src), metadata_dict(r)
    src_tok = {k: v for k, v in src_meta.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in meta.items() if k.startswith("tokenizer.")} == src_tok
    for k in src_tok:  # the GGUF types too (e.g. scores stay float32 arrays, ids uint32)
        assert r.fields[k].types == r_src.fields[k].types, k
    assert meta["llama.vocab_size"] == 32000
    assert tensors(path)["token_embd.weight"][0] == (64, 32000)


# ------------------------------------------------------------------------------------------ peaky logits


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("llama", False), ("llama", True)])
def test_greedy_is_stable_under_noise(tmp_path, arch, tied):
    """64 greedy steps for several seeds: the top-1 logit leads the top-2 by far more than 1e-2, so float
    noise of that size cannot change a greedy choice, and attention/FFN still move the logits."""
    prompt = [5, 17, 99, 3, 42, 250, 7, 61]
    for seed in range(3):
        ref = ReferenceModel(make_tiny(tmp_path / f"{seed}.gguf", arch=arch, seed=seed, tied=tied))
        out = ref.greedy(prompt, 64)
        ref.reset()
        logits = ref.forward(prompt + out[:-1])[len(prompt) - 1 :]  # [64, n_vocab], row i chose out[i]
        top2 = np.sort(logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        assert margin.min() > 2.0, (seed, float(margin.min()))
        noise = np.random.default_rng(seed).uniform(-1e-2, 1e-2, logits.shape)
        assert np.array_equal((logits + noise).argmax(axis=1), logits.argmax(axis=1))

    # the context matters: the same token after different prefixes gets logits that differ by ~1
    a = ref.forward([1, 2, 3, 200])[-1]
    b = ref.forward([9, 8, 7, 6, 5, 200])[-1]
    assert np.abs(a - b).max() > 0.3


def test_untied_greedy_walks_a_permutation(tmp_path):
    ref = ReferenceModel(make_tiny(tmp_path / "m.gguf", arch="llama", tied=False))
    out = ref.greedy([10, 20, 30], 32)
    assert len(set(out)) > 20  # not stuck on one token


# ---------------------------------------------------------------------------------------- errors and CLI


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        make_tiny(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="unknown tensor type"):
        make_tiny(tmp_path / "m.gguf", qtype="Q3_X")
    with pytest.raises(ValueError, match="n_embd = 64 is not a multiple"):
        make_tiny(tmp_path / "m.gguf", qtype="Q4_K")
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        make_tiny(tmp_path / "m.gguf", n_head=4, n_head_kv=3)


def test_main(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    argv = [str(out), "--arch", "llama", "--type", "q4_0", "--seed", "2", "--n-embd", "32", "--n-layer", "1",
            "--n-head", "2", "--n-head-kv", "1", "--head-dim", "16", "--n-ff", "64", "--n-ctx", "128",
            "--tied"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = read_metadata(str(out))
    assert meta["llama.context_length"] == 128 and meta["llama.block_count"] == 1
    assert "output.weight" not in tensors(out) and tensors(out)["token_embd.weight"][1] == QT.Q4_0
    assert main([str(tmp_path / "x.gguf"), "--type", "Q6_K"]) == 2
    assert "not a multiple" in capsys.readouterr().err


# --------------------------------------------------------------------- qwen35 / qwen35moe (more in test_reference_qwen35.py)


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_hybrid_deterministic_and_types_share_weights(tmp_path, arch):
    a = make_tiny(tmp_path / "a.gguf", arch=arch, seed=4, mtp=True)
    b = make_tiny(tmp_path / "b.gguf", arch=arch, seed=4, mtp=True)
    assert a.read_bytes() == b.read_bytes()
    # the trunk's tensors do not depend on whether the MTP block is written
    ref, q = ReferenceModel(a), ReferenceModel(make_tiny(tmp_path / "q.gguf", arch=arch, seed=4, qtype="Q8_0"))
    assert set(q.w) < set(ref.w)
    for name, w in q.w.items():
        err = np.sqrt(np.mean((ref.w[name] - w) ** 2)) / np.sqrt(np.mean(ref.w[name] ** 2))
        assert err < 1e-2, (name, err)
    assert tensors(q.path)["blk.0.ssm_conv1d.weight"][1] == QT.F32  # kept F32 as the converter does
    assert tensors(q.path)["blk.0.attn_qkv.weight"][1] == QT.Q8_0
