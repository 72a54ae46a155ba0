"""`nextn make-tiny`: random GGUF models from a seed, laid out exactly as llama.cpp's converter writes them.

Tensor names, shapes and metadata keys are those convert_hf_to_gguf.py writes for Qwen3ForCausalLM
(arch "qwen3") and LlamaForCausalLM (arch "llama"), so the loader meets the layout of real files:

    token_embd.weight      [n_vocab, n_embd]          (numpy shape; GGUF's ne is the reverse)
    blk.{i}.attn_norm      [n_embd]                   float32, as llama.cpp keeps every norm
    blk.{i}.attn_q         [n_head*head_dim, n_embd]
    blk.{i}.attn_k/_v      [n_head_kv*head_dim, n_embd]
    blk.{i}.attn_output    [n_embd, n_head*head_dim]
    blk.{i}.attn_q_norm/_k_norm [head_dim]            qwen3 only (per-head RMSNorm of q and k)
    blk.{i}.ffn_norm       [n_embd]
    blk.{i}.ffn_gate/_up   [n_ff, n_embd]
    blk.{i}.ffn_down       [n_embd, n_ff]
    output_norm.weight     [n_embd]
    output.weight          [n_vocab, n_embd]          absent when tied (the head reuses token_embd)

Every 2-D weight, token_embd included (llama.cpp keeps it in the file type too), is in the chosen type.
RoPE: qwen3 uses NEOX rotation (pairs i, i+n_rot/2); llama uses NORM rotation (adjacent pairs 2i, 2i+1),
the order llama.cpp's converter permutes Llama's q/k rows into. The weights are random, so the permutation
itself is not applied; the reference forward (tests/reference.py) applies each arch's rotation.

Peaky logits. Random weights alone give logits whose top-2 gap is a small fraction of their spread, so
float noise would flip greedy choices. Here the residual stream stays dominated by the current token's
embedding (each attention / FFN branch adds about BRANCH_RMS of it), and the head maps that embedding onto
one token: untied, output row v is the embedding of token follow[v] scaled (so token t is followed by the v
with follow[v] == t, a random permutation of the vocabulary); tied, the head is token_embd itself (a token
predicts itself) with output_norm scaled instead. The top-1 logit then leads by ~sqrt(n_embd) times the
spread of the rest (margins of tens of logits; see tests/test_tiny.py), while attention and FFN still move
every logit by ~1, far above any kernel comparison tolerance, so a wrong kernel is still caught. The greedy
choice is therefore mostly a function of the last token: compare logits, not only tokens, in engine tests.

Speed: tensors are generated (float32, a seed per tensor) and written in row chunks straight to the file,
so a ~300M-parameter Q8_0 model with a 152k vocabulary is made in a few seconds.
"""

import argparse
import collections
import itertools
import re
import sys
import zlib
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from nextn.gguf.quantize import SUPPORTED, block_size, parse_qtype, quantize, row_bytes
from nextn.tokenizer import BYTE_TO_UNICODE

ARCHS = ("qwen3", "llama")
TYPES = tuple(t.name for t in SUPPORTED)

BRANCH_RMS = 0.2  # RMS each attention / FFN branch adds to the unit-RMS residual stream (all layers together)
OUTPUT_GAIN = 4.0  # logit spread of the non-winning tokens; the winner leads by ~0.9*sqrt(n_embd)*OUTPUT_GAIN

# defaults of the real models these stand in for (Qwen3's config.json, Llama 3's)
_ROPE_BASE = {"qwen3": 1_000_000.0, "llama": 500_000.0}
_RMS_EPS = {"qwen3": 1e-6, "llama": 1e-5}
_TIED = {"qwen3": True, "llama": False}  # Qwen3 0.6B-4B tie the head to the embedding; Llama 3 8B does not

# general.file_type (llama.cpp's LlamaFileType) of a file whose matrices are all of one type
_FILE_TYPE = {
    QT.F32: gguf.LlamaFileType.ALL_F32,
    QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A small English text the byte vocabulary's merges are learned from (any text works; this one is fixed so
# the vocabulary is the same on every machine).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model is made from a seed so that every test sees the
same weights. When the server starts, it reads the model file, builds the kernels and then answers requests
over a socket. Each request asks for some text: the prompt is split into tokens, the tokens are turned into
vectors, and the model predicts the next token again and again until it reaches the end or the limit.
There are many ways to make this faster. One of them is to guess several tokens at once and to check all
of the guesses in a single step; the guesses that are right are kept and the rest are thrown away. This is
called speculative decoding, and it is the reason this project exists. In the morning the weather was cold
and the streets were quiet. She opened the window, looked at the river and thought about the long day that
was waiting for her. Nothing is more important than the time we spend with the people we love. They walked
along the road, talked about their work, their friends and the places they wanted to see before the end of
the year. Would you like a cup of tea? I think that it is going to rain this afternoon, so take an umbrella
with you when you go out. The number of tokens in the vocabulary is small, but it is enough for tests.
"""

# qwen2's pre-tokenizer split, restricted to ASCII (the corpus is ASCII): contractions, a word with an
# optional leading non-letter (usually the space), single digits, punctuation runs, whitespace
_PRETOKENIZE = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]"
    r"| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table as a list (token i of the byte vocabulary is byte i)."""
    return [BYTE_TO_UNICODE[b] for b in range(256)]


def learn_merges(text: str, n_merges: int) -> list[str]:
    """Byte-level BPE training: repeatedly merge the most frequent adjacent pair inside pre-tokens (ties go
    to the lexicographically smallest pair, so the result is deterministic). Stops at pairs seen once."""
    b2u = byte_to_unicode()
    words = collections.Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in _PRETOKENIZE.findall(text)
    )
    merges: list[str] = []
    while len(merges) < n_merges:
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for a, b in itertools.pairwise(word):
                pairs[a, b] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        a, b = min(p for p, c in pairs.items() if c == best_count)
        merges.append(f"{a} {b}")
        merged: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _write_bytes_vocab(w: gguf.GGUFWriter, n_merges: int = 256) -> int:
    """A small byte-level BPE vocabulary: 256 byte tokens (id == byte), learned merges, ChatML specials."""
    merges = learn_merges(_CORPUS, n_merges)
    tokens = byte_to_unicode() + [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    eot = len(tokens)
    tokens += SPECIALS
    types += [gguf.TokenType.CONTROL] * len(SPECIALS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eot)  # <|endoftext|>, as Qwen2's tokenizer has it; <|im_end|> ends a chat turn
    w.add_pad_token_id(eot)
    w.add_bos_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    return len(tokens)


def _copy_vocab(w: gguf.GGUFWriter, path: str) -> int:
    """Copies every tokenizer.* key (value and GGUF type) of another GGUF file, e.g. llama.cpp's vocab
    files."""
    from nextn.gguf.header import read_header

    header = read_header(path)
    meta = header.meta
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"make-tiny: {path} has no tokenizer.ggml.tokens to copy")
    for key, (vtype, sub) in header.types.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, meta[key], vtype, sub_type=sub)
    return len(meta["tokenizer.ggml.tokens"])


class _Rng:
    """One float32 Generator per tensor, keyed by (seed, tensor name): a tensor's values do not depend on
    which other tensors exist or the order they are made in."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])


def make_tiny(
    path, arch: str = "qwen3", qtype: str = "F32", seed: int = 0, n_embd: int = 64, n_layer: int = 2,
    n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16, n_ff: int = 128, n_ctx: int = 256,
    vocab: str = "bytes", tied: bool | None = None, *, rope_freq_base: float | None = None,
    output_gain: float = OUTPUT_GAIN,
) -> Path:
    """Writes a random model to `path` and returns it as a Path.

    vocab: "bytes" (a small byte-level BPE with ChatML specials) or the path of a GGUF file whose
    tokenizer.* keys are copied (n_vocab = its token count). tied: None = the arch's usual choice
    (qwen3 tied, llama not). Raises ValueError on a bad shape, type or architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"make-tiny: unknown architecture {arch!r} (have: {', '.join(ARCHS)})")
    gq = parse_qtype(qtype)
    tied = _TIED[arch] if tied is None else bool(tied)
    if n_head % n_head_kv:
        raise ValueError(f"make-tiny: n_head {n_head} must be a multiple of n_head_kv {n_head_kv}")
    if min(n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, n_ctx) < 1 or head_dim % 2:
        raise ValueError("make-tiny: sizes must be positive and head_dim even")
    for what, n_cols in (("n_embd", n_embd), ("n_head*head_dim", n_head * head_dim), ("n_ff", n_ff)):
        if n_cols % block_size(gq):
            raise ValueError(
                f"make-tiny: {gq.name} packs rows in blocks of {block_size(gq)}, but {what} = {n_cols} "
                f"is not a multiple of it (matrices have rows of n_embd, n_head*head_dim and n_ff elements)"
            )
    path = Path(path)
    rng = _Rng(seed)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"tiny-{arch}-{gq.name.lower()}-seed{seed}")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(_ROPE_BASE[arch] if rope_freq_base is None else float(rope_freq_base))
    w.add_layer_norm_rms_eps(_RMS_EPS[arch])
    if arch == "qwen3" or head_dim != n_embd // n_head:
        # the converter writes these from config.json's head_dim (Qwen3 always has one); llama.cpp
        # otherwise derives head_dim as n_embd / n_head
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(_FILE_TYPE[gq])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = _write_bytes_vocab(w) if vocab == "bytes" else _copy_vocab(w, str(vocab))
    if arch == "llama":
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(head_dim)

    # ---- the tensors: (name, numpy shape, maker) in llama.cpp's order; makers yield float32 row chunks
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    branch = BRANCH_RMS / np.sqrt(2 * n_layer)  # each of the 2*n_layer branches; they add up to BRANCH_RMS
    embd_cache: dict[str, np.ndarray] = {}

    def gaussian(name, n_rows, n_cols, rms):
        """Entries N(0, rms^2 / n_cols): x @ W.T of a unit-RMS x has entries of RMS `rms`."""
        g = rng(name)
        std = np.float32(rms / np.sqrt(n_cols))
        step = max(1, (1 << 23) // n_cols)
        for r0 in range(0, n_rows, step):
            yield g.standard_normal((min(step, n_rows - r0), n_cols), dtype=np.float32) * std

    def norm_weight(name, n, center=1.0):
        g = rng(name)
        yield (center * (1.0 + 0.1 * g.standard_normal(n, dtype=np.float32))).astype(np.float32)[None, :]

    def embedding(name):
        # unit-RMS rows, the scale RMSNorm gives the residual stream; kept when the untied head needs it
        chunks = []
        for c in gaussian(name, n_vocab, n_embd, np.sqrt(n_embd)):
            if not tied:
                chunks.append(c)
            yield c
        if not tied:
            embd_cache["e"] = np.concatenate(chunks)

    def head(name):
        # row v = embedding of token follow[v], scaled: after token t comes the v with follow[v] == t
        e = embd_cache.pop("e")
        follow = rng(name).permutation(n_vocab)
        scale = np.float32(output_gain / np.sqrt(n_embd))
        step = max(1, (1 << 23) // n_embd)
        for r0 in range(0, n_vocab, step):
            yield e[follow[r0 : r0 + step]] * scale

    # the tied head is token_embd itself (self-prediction, logit ~ |e|^2): output_norm sets its scale instead
    out_norm_center = output_gain / np.sqrt(n_embd) if tied else 1.0
    tensors = [("token_embd.weight", (n_vocab, n_embd), gq, lambda n: embedding(n))]
    for il in range(n_layer):
        b = f"blk.{il}."
        tensors += [
            (b + "attn_norm.weight", (n_embd,), QT.F32, lambda n: norm_weight(n, n_embd)),
            (b + "attn_q.weight", (q_dim, n_embd), gq, lambda n: gaussian(n, q_dim, n_embd, 1.0)),
            (b + "attn_k.weight", (kv_dim, n_embd), gq, lambda n: gaussian(n, kv_dim, n_embd, 1.0)),
            (b + "attn_v.weight", (kv_dim, n_embd), gq, lambda n: gaussian(n, kv_dim, n_embd, 1.0)),
            # attention output averages v rows (RMS shrinks ~1/sqrt of the positions mixed): 2x makes up part
            (b + "attn_output.weight", (n_embd, q_dim), gq, lambda n: gaussian(n, n_embd, q_dim, 2 * branch)),
        ]
        if arch == "qwen3":
            tensors += [
                (b + "attn_q_norm.weight", (head_dim,), QT.F32, lambda n: norm_weight(n, head_dim)),
                (b + "attn_k_norm.weight", (head_dim,), QT.F32, lambda n: norm_weight(n, head_dim)),
            ]
        tensors += [
            (b + "ffn_norm.weight", (n_embd,), QT.F32, lambda n: norm_weight(n, n_embd)),
            (b + "ffn_gate.weight", (n_ff, n_embd), gq, lambda n: gaussian(n, n_ff, n_embd, 1.0)),
            (b + "ffn_up.weight", (n_ff, n_embd), gq, lambda n: gaussian(n, n_ff, n_embd, 1.0)),
            # silu(g) * u of unit-RMS g, u has RMS ~0.6
            (b + "ffn_down.weight", (n_embd, n_ff), gq, lambda n: gaussian(n, n_embd, n_ff, branch / 0.6)),
        ]
    tensors.append(
        ("output_norm.weight", (n_embd,), QT.F32, lambda n: norm_weight(n, n_embd, out_norm_center))
    )
    if not tied:
        tensors.append(("output.weight", (n_vocab, n_embd), gq, lambda n: head(n)))

    for name, shape, qt, _ in tensors:
        nbytes = (shape[0] if len(shape) == 2 else 1) * row_bytes(shape[-1], qt)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())  # tensor data starts aligned
    for name, shape, qt, maker in tensors:
        written = 0
        for chunk in maker(name):
            data = quantize(chunk, qt)
            data.tofile(fout)
            written += data.nbytes
        w.write_padding(fout, written)  # each tensor's data is padded to the alignment
    w.close()
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="nextn make-tiny", description="Write a random tiny GGUF model from a seed."
    )
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", default="qwen3", choices=ARCHS)
    p.add_argument("--type", default="F32", type=str.upper, choices=TYPES, help="type of every 2-D weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-head-kv", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--n-ff", type=int, default=128)
    p.add_argument("--n-ctx", "--ctx-size", dest="n_ctx", type=int, default=256,
                   help="context_length metadata")
    p.add_argument("--vocab", default="bytes",
                   help="'bytes' (a small byte-level BPE with ChatML specials) or a GGUF file to copy "
                   "tokenizer.* from")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None,
                     help="no output.weight: the head reuses token_embd (default for qwen3)")
    tie.add_argument("--untied", dest="tied", action="store_false",
                     help="write output.weight (default for llama)")
    p.add_argument("--rope-freq-base", type=float, default=None,
                   help="default: the arch's (qwen3 1e6, llama 5e5)")
    a = p.parse_args(argv)
    try:
        out = make_tiny(a.out, a.arch, a.type, a.seed, a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.head_dim,
                        a.n_ff, a.n_ctx, a.vocab, a.tied, rope_freq_base=a.rope_freq_base)
    except (ValueError, OSError) as e:
        print(f"nextn make-tiny: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
