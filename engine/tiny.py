"""`nextn make-tiny`: random GGUF models of every supported architecture, from a seed, for tests.

Tensor names, shapes and metadata keys are those llama.cpp's convert_hf_to_gguf.py writes for
Qwen3ForCausalLM (arch `qwen3`: per-head q/k norm, NeoX RoPE) and LlamaForCausalLM (arch `llama`: no q/k
norm, RoPE on adjacent pairs), so the loader is tested on the layout real files have.

The weights are random but built so that greedy decoding is stable under float noise: every layer adds a
bounded amount to the residual stream, which stays dominated by the current token's embedding, and the
output head maps each token's embedding, scaled up, onto one fixed "next" token (a random permutation).
The top-1 logit then leads the top-2 by many times the error of any kernel, while attention and FFN still
move every logit by far more than the comparison tolerance, so a wrong kernel is still caught.
"""

import argparse
from pathlib import Path

import gguf
import numpy as np

from nextn.gguf.quantize import quantize

ARCHS = ("qwen3", "llama")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
OUTPUT_GAIN = 16.0  # norm of an output row relative to an embedding row: sets the logit margins
BRANCH_GAIN = 0.3  # norm of each attention / FFN branch output relative to the residual

_BYTES_MERGES = ["Ġ t", "h e", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġ s", "e n", "a t", "o r",
                 "Ġt he", "Ġ w", "e s", "Ġ o", "i s", "Ġ c", "i t", "a l"]


def _byte_unicode() -> list[str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _bytes_vocab(w: gguf.GGUFWriter) -> int:
    """A small byte-level BPE vocabulary (gpt2 model, qwen2 pre-tokenizer) with ChatML specials."""
    tokens = _byte_unicode()
    for m in _BYTES_MERGES:
        tokens.append(m.replace(" ", ""))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    types += [gguf.TokenType.CONTROL] * len(specials)
    eot = len(tokens) - 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_BYTES_MERGES)
    w.add_eos_token_id(eot)
    w.add_bos_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return len(tokens)


def _copy_vocab(w: gguf.GGUFWriter, path: str) -> int:
    """All tokenizer.* keys of another GGUF file (e.g. llama.cpp's vocab-only files)."""
    from nextn.gguf.metadata import metadata_dict

    r = gguf.GGUFReader(path, "r")
    meta = metadata_dict(r)
    for key, field in r.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, meta[key], field.types[0], sub_type=sub)
    return len(meta["tokenizer.ggml.tokens"])


def make_tiny(
    path, arch: str = "qwen3", qtype: str = "F32", seed: int = 0, n_embd: int = 64, n_layer: int = 2,
    n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16, n_ff: int = 128, n_ctx: int = 256,
    vocab: str = "bytes", tied: bool = False, rope_freq_base: float = 10000.0,
) -> Path:
    if arch not in ARCHS:
        raise ValueError(f"make-tiny: unknown architecture {arch!r} (have: {', '.join(ARCHS)})")
    qtype = qtype.upper()
    if qtype not in TYPES:
        raise ValueError(f"make-tiny: unknown type {qtype!r} (have: {', '.join(TYPES)})")
    if arch == "llama" and n_embd != n_head * head_dim:
        raise ValueError("make-tiny: llama files carry no key_length, so n_embd must equal n_head * head_dim")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    for name, n in (("n_embd", n_embd), ("n_ff", n_ff), ("n_head * head_dim", n_head * head_dim)):
        if n % block:
            raise ValueError(f"make-tiny: {name} = {n} is not a multiple of the {qtype} block size {block}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{qtype.lower()}-seed{seed}")
    n_vocab = _bytes_vocab(w) if vocab == "bytes" else _copy_vocab(w, vocab)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(rope_freq_base)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    ftype = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}[qtype]
    w.add_file_type(ftype)
    gq = gguf.GGMLQuantizationType[qtype]

    def matrix(name, n_rows, n_cols, gain=1.0):
        # rows of norm `gain` (entries ~ N(0, gain^2 / n_cols))
        m = rng.standard_normal((n_rows, n_cols), dtype=np.float32) * np.float32(gain / np.sqrt(n_cols))
        add_matrix(name, m)

    def add_matrix(name, m):
        w.add_tensor(name, quantize(m, gq), raw_dtype=gq)  # uint8 rows: gguf-py derives the shape from the bytes

    def norm_w(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    # embeddings with unit-RMS rows, the scale RMSNorm gives the residual stream
    embd = rng.standard_normal((n_vocab, n_embd), dtype=np.float32)
    add_matrix("token_embd.weight", embd)
    norm_w("output_norm.weight", n_embd)
    if not tied:
        # output row j = the (scaled) embedding of the token that j follows: a random permutation of the vocab
        follows = rng.permutation(n_vocab)
        out = embd[follows] * np.float32(OUTPUT_GAIN / np.sqrt(n_embd))
        add_matrix("output.weight", out)
    # A matrix of gain g maps an input of norm |x| to an output of norm g * |x| * sqrt(n_rows / n_cols).
    # q/k/v and gate/up keep unit-size entries; attn_output and ffn_down bring each branch to
    # `branch` times the residual's norm (silu(gate) * up has entries of about half size, hence the 2).
    branch = BRANCH_GAIN / np.sqrt(n_layer)
    for il in range(n_layer):
        b = f"blk.{il}."
        norm_w(b + "attn_norm.weight", n_embd)
        matrix(b + "attn_q.weight", n_head * head_dim, n_embd)
        matrix(b + "attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(b + "attn_output.weight", n_embd, n_head * head_dim, branch)
        if arch == "qwen3":
            norm_w(b + "attn_q_norm.weight", head_dim)
            norm_w(b + "attn_k_norm.weight", head_dim)
        norm_w(b + "ffn_norm.weight", n_embd)
        matrix(b + "ffn_gate.weight", n_ff, n_embd)
        matrix(b + "ffn_up.weight", n_ff, n_embd)
        matrix(b + "ffn_down.weight", n_embd, n_ff, 2 * branch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nextn make-tiny", description="write a random tiny GGUF model from a seed")
    p.add_argument("out")
    p.add_argument("--arch", default="qwen3", choices=ARCHS)
    p.add_argument("--type", default="F32", choices=TYPES, type=str.upper)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-head-kv", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--n-ff", type=int, default=128)
    p.add_argument("--ctx-size", type=int, default=256)
    p.add_argument("--vocab", default="bytes", help="'bytes' (a small byte-level BPE) or a GGUF file to copy the tokenizer from")
    p.add_argument("--tied", action="store_true", help="no output.weight: the head reuses token_embd")
    a = p.parse_args(argv)
    out = make_tiny(a.out, a.arch, a.type, a.seed, a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.head_dim,
                    a.n_ff, a.ctx_size, a.vocab, a.tied)
    print(out)
    return 0
