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

from nextn.gguf.model_file import Metadata
from nextn.gguf.quantize import SUPPORTED, block_size, parse_qtype, quantize, row_bytes
from nextn.models import ARCHITECTURES
from nextn.tokenizer import BYTE_TO_UNICODE

ARCHS = ("qwen3", "qwen2", "llama", "qwen35", "qwen35moe", "glm4moe", "step35")
HYBRID = ("qwen35", "qwen35moe")  # Gated DeltaNet + gated full attention
MTP_ARCHS = ("qwen35", "qwen35moe", "glm4moe", "step35")
F32_ONLY = frozenset({QT.F32})
KEEP_F32 = ("ffn_gate_inp.weight", "ssm_conv1d.weight")  # the converter (and llama-quantize) keep these F32
TYPES = tuple(t.name for t in SUPPORTED)

BRANCH_RMS = 0.2  # RMS each attention / FFN branch adds to the unit-RMS residual stream (all layers together)
OUTPUT_GAIN = 4.0  # logit spread of the non-winning tokens; the winner leads by ~0.9*sqrt(n_embd)*OUTPUT_GAIN

# defaults of the real models these stand in for (Qwen3's config.json, Llama 3's)
_ROPE_BASE = {"qwen3": 1_000_000.0, "qwen2": 1_000_000.0, "llama": 500_000.0, "qwen35": 10_000_000.0, "qwen35moe": 10_000_000.0,
              "glm4moe": 1_000_000.0, "step35": 5_000_000.0}
_RMS_EPS = {"qwen3": 1e-6, "qwen2": 1e-6, "llama": 1e-5, "qwen35": 1e-6, "qwen35moe": 1e-6, "glm4moe": 1e-5,
            "step35": 1e-5}
# Qwen3 0.6B-4B and Qwen2.5 up to 3B tie the head to the embedding; Llama 3 8B, Qwen3.5/3.6 27B and 35B-A3B,
# GLM-4.5 do not
_TIED = {"qwen3": True, "qwen2": True, "llama": False, "qwen35": False, "qwen35moe": False, "glm4moe": False,
         "step35": False}
# hybrids: 3 linear layers, then 1 full; glm4moe: 1 dense layer (leading_dense_block_count), then 2 MoE;
# step35: full (dense), sliding, sliding, full (MoE), as Step-3.5's pattern of one full layer then three sliding
_N_LAYER = {"qwen3": 2, "qwen2": 2, "llama": 2, "qwen35": 4, "qwen35moe": 4, "glm4moe": 3, "step35": 4}
STEP35_SWA_ROPE_BASE = 10_000.0  # Step-3.5's sliding layers' rope_theta

# general.file_type (llama.cpp's LlamaFileType) of a file whose matrices are all of one type
_FILE_TYPE = {
    QT.F32: gguf.LlamaFileType.ALL_F32,
    QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QT.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    QT.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    QT.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
    QT.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS,
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


def rope_sections_default(n_rot: int) -> list[int]:
    """[t, h, w, 0] splitting the n_rot/2 rotated pairs as Qwen3.5's [11, 11, 10, 0] splits 32 (t = h =
    ceil(half/3)), or, where that leaves a pair on the extra channel (half = 4: [2, 2, 0]), h = w = half//3."""
    half = n_rot // 2
    c, f = -(-half // 3), half // 3
    for sections in ([c, c, half - 2 * c, 0], [half - 2 * f, f, f, 0]):
        if min(sections) >= 0 and 3 not in imrope_channels(sections, n_rot):
            return sections
    raise ValueError(f"make-tiny: no M-RoPE sections for n_rot {n_rot}; pass rope_sections")


def imrope_channels(sections, n_rot: int) -> list[int]:
    """Which position channel (0 t, 1 h, 2 w, 3 e) rotates pair i < n_rot/2 under ggml's interleaved M-RoPE
    (ggml_mrope_cache_init with is_imrope): sector = i % sum(sections); sector % 3 picks t/h/w while
    sector < 3 * that section, else the extra channel e."""
    total = sum(sections)
    out = []
    for i in range(n_rot // 2):
        s = i % total
        if s % 3 == 1 and s < 3 * sections[1]:
            out.append(1)
        elif s % 3 == 2 and s < 3 * sections[2]:
            out.append(2)
        elif s % 3 == 0 and s < 3 * sections[0]:
            out.append(0)
        else:
            out.append(3)
    return out


def make_tiny(
    path, arch: str = "qwen3", qtype: str = "F32", seed: int = 0, n_embd: int = 64, n_layer: int | None = None,
    n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16, n_ff: int = 128, n_ctx: int = 256,
    vocab: str = "bytes", tied: bool | None = None, *, rope_freq_base: float | None = None,
    output_gain: float = OUTPUT_GAIN, mtp: bool = False, mtp_own_head: bool = False,
    full_attention_interval: int = 4, recurrent_layers_key: bool = True, n_rot: int | None = None,
    rope_sections: "list[int] | None" = None, ssm_d_conv: int = 4, ssm_d_state: int = 16, ssm_n_group: int = 2,
    ssm_dt_rank: int = 4, n_expert: int = 8, n_expert_used: int = 2, n_ff_exp: int = 32, n_ff_shexp: int = 32,
    n_expert_shared: int = 1, n_dense_lead: int = 1, qk_norm: bool = False, qkv_bias: bool = True,
    expert_weights_scale: float = 1.5, rope_freqs: bool = False, weights: "dict | None" = None,
    name: str | None = None, n_head_swa: int | None = None, n_swa: int = 8, n_nextn: int = 3,
    swiglu_limit: float = 1.0,
) -> Path:
    """Writes a random model to `path` and returns it as a Path.

    vocab: "bytes" (a small byte-level BPE with ChatML specials), the path of a GGUF file whose
    tokenizer.* keys are copied (n_vocab = its token count), or a callable that writes the tokenizer keys
    (and any other metadata) with the GGUFWriter it is given and returns n_vocab.
    weights: trained weights instead of random ones, float32 arrays by tensor name in numpy shape (every
    tensor of the table, nothing else; tools/train/export.py). name: general.name. tied: None = the arch's usual choice
    (qwen3 tied, the others not). n_layer: None = 2 (qwen3, llama), 4 (qwen35, qwen35moe: with
    full_attention_interval 4, layers 0-2 are linear attention and layer 3 full attention) or 3 (glm4moe:
    one dense layer, then two MoE layers). The tensors are the architecture's own table
    (engine/models/<arch>.py: tensor_table), so they are what the loader reads.

    qwen35 / qwen35moe / glm4moe:
      mtp: append the MTP block as layer n_layer (block_count = n_layer + 1, nextn_predict_layers = 1).
      mtp_own_head: also write the optional nextn.embed_tokens / nextn.shared_head_head (the converter does
        not for Qwen3.5/3.6, whose MTP block shares the trunk's; these stand in for files that do).
    qwen35 / qwen35moe:
      recurrent_layers_key: write {arch}.attention.recurrent_layers (the converter does when config.json has
        layer_types, as Qwen3.5 has); False leaves only {arch}.full_attention_interval for the loader.
      n_rot: rotated dims (default head_dim / 2; real Qwen3.5 rotates 64 of 256); rope_sections: M-RoPE
        [t, h, w, e] pair counts (default rope_sections_default(n_rot)).
      ssm_*: Gated DeltaNet sizes as llama.cpp names them: d_conv kernel, d_state = head_k_dim = head_v_dim,
        n_group = key heads, dt_rank = value heads (inner size = d_state * dt_rank).
      n_expert, n_expert_used, n_ff_exp, n_ff_shexp: qwen35moe's routed and shared experts.
    glm4moe: n_expert, n_expert_used, n_ff_exp (also qwen35moe's), n_expert_shared (shared experts of
      n_ff_exp each), n_dense_lead (leading_dense_block_count), qk_norm (GLM-4.5 355B has q/k norms, Air not),
      qkv_bias, expert_weights_scale (routed_scaling_factor); n_rot as for qwen35 (partial_rotary_factor 0.5).
    step35: layers alternate as Step-3.5's (full when il % 4 == 0 or il is the last trunk layer, else sliding;
      the MTP blocks sliding but the last), n_head query heads in full layers and n_head_swa (default
      2 n_head) in sliding ones, n_swa the sliding window; layer 0 dense (n_dense_lead), the others MoE with a
      shared expert of n_ff_shexp; qk_norm; the head-wise attention gate always; swiglu_limit the routed
      experts' SwiGLU limit of layers >= 2 and the shared expert's / dense FFN's of layers 0 and 3 (0: none;
      the converter writes 0 for the MTP blocks); mtp: n_nextn MTP blocks (Step-3.5-Flash has 3).
    rope_freqs: qwen3 / qwen2 / llama / step35: write Llama 3.1's rope_freqs.weight (a divisor per rotated
      pair; step35: its full layers').
    Raises ValueError on a bad shape, type or architecture.
    """
    if arch not in ARCHS:
        raise ValueError(f"make-tiny: unknown architecture {arch!r} (have: {', '.join(ARCHS)})")
    gq = parse_qtype(qtype)
    tied = _TIED[arch] if tied is None else bool(tied)
    n_layer = _N_LAYER[arch] if n_layer is None else int(n_layer)
    hybrid = arch in HYBRID
    if (mtp or mtp_own_head) and arch not in MTP_ARCHS:
        raise ValueError(f"make-tiny: an MTP block exists for {', '.join(MTP_ARCHS)} only, not {arch}")
    if n_head % n_head_kv:
        raise ValueError(f"make-tiny: n_head {n_head} must be a multiple of n_head_kv {n_head_kv}")
    if min(n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, n_ctx) < 1 or head_dim % 2:
        raise ValueError("make-tiny: sizes must be positive and head_dim even")
    row_lengths = [("n_embd", n_embd), ("n_head*head_dim", n_head * head_dim), ("n_ff", n_ff)]
    if hybrid:
        n_rot = head_dim // 2 if n_rot is None else int(n_rot)
        if n_rot < 2 or n_rot % 2 or n_rot > head_dim:
            raise ValueError(f"make-tiny: n_rot {n_rot} must be even and in 2..head_dim")
        rope_sections = rope_sections_default(n_rot) if rope_sections is None else list(rope_sections)
        if len(rope_sections) != 4 or min(rope_sections) < 0 or sum(rope_sections[:3]) < 1:
            raise ValueError(f"make-tiny: rope_sections {rope_sections} must be 4 counts, t/h/w not all 0")
        if min(ssm_d_conv, ssm_d_state, ssm_n_group, ssm_dt_rank, full_attention_interval) < 1:
            raise ValueError("make-tiny: ssm sizes and full_attention_interval must be positive")
        if ssm_dt_rank % ssm_n_group:
            raise ValueError(f"make-tiny: ssm_dt_rank {ssm_dt_rank} (value heads) must be a multiple of "
                             f"ssm_n_group {ssm_n_group} (key heads)")
        row_lengths += [("ssm_d_inner", ssm_d_state * ssm_dt_rank), ("2*n_embd", 2 * n_embd)]
        if arch == "qwen35moe":
            if not 1 <= n_expert_used <= n_expert or min(n_ff_exp, n_ff_shexp) < 1:
                raise ValueError("make-tiny: need 1 <= n_expert_used <= n_expert and positive expert sizes")
            row_lengths += [("n_ff_exp", n_ff_exp), ("n_ff_shexp", n_ff_shexp)]
    if arch == "glm4moe":
        n_rot = head_dim // 2 if n_rot is None else int(n_rot)
        if n_rot < 2 or n_rot % 2 or n_rot > head_dim:
            raise ValueError(f"make-tiny: n_rot {n_rot} must be even and in 2..head_dim")
        if not 1 <= n_expert_used <= n_expert or n_ff_exp < 1 or n_expert_shared < 0:
            raise ValueError("make-tiny: need 1 <= n_expert_used <= n_expert and positive expert sizes")
        if not 0 <= n_dense_lead <= n_layer:
            raise ValueError(f"make-tiny: n_dense_lead {n_dense_lead} must be in 0..n_layer")
        row_lengths += [("n_ff_exp", n_ff_exp), ("2*n_embd", 2 * n_embd)]
    for what, n_cols in row_lengths:
        if n_cols % block_size(gq):
            have = ", ".join(name for name, _ in row_lengths)
            raise ValueError(
                f"make-tiny: {gq.name} packs rows in blocks of {block_size(gq)}, but {what} = {n_cols} "
                f"is not a multiple of it (matrices have rows of {have} elements)"
            )
    path = Path(path)
    rng = _Rng(seed)
    step35 = arch == "step35"
    if step35:
        n_head_swa = 2 * n_head if n_head_swa is None else int(n_head_swa)
        if n_head_swa % n_head_kv or min(n_swa, n_nextn, n_head_swa) < 1:
            raise ValueError("make-tiny: step35 needs n_head_swa a multiple of n_head_kv, n_swa, n_nextn >= 1")
        if not 1 <= n_expert_used <= n_expert or min(n_ff_exp, n_ff_shexp) < 1:
            raise ValueError("make-tiny: need 1 <= n_expert_used <= n_expert and positive expert sizes")
        for what, n_cols in [("n_ff_exp", n_ff_exp), ("n_ff_shexp", n_ff_shexp), ("2*n_embd", 2 * n_embd),
                             ("n_head_swa*head_dim", n_head_swa * head_dim)]:
            if n_cols % block_size(gq):
                raise ValueError(f"make-tiny: {gq.name} packs rows in blocks of {block_size(gq)}, but {what} = "
                                 f"{n_cols} is not a multiple of it")
    n_mtp = (n_nextn if step35 else 1) if mtp else 0
    n_block = n_layer + n_mtp  # llama.cpp counts the MTP blocks in block_count

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or f"tiny-{arch}-{gq.name.lower()}-seed{seed}")
    w.add_block_count(n_block)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    if step35:
        swa = [il % 4 != 0 and il != n_layer - 1 for il in range(n_layer)] + [k < n_mtp - 1 for k in range(n_mtp)]
        w.add_head_count([n_head_swa if s else n_head for s in swa])
        w.add_head_count_kv([n_head_kv] * n_block)
    else:
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
    if hybrid:
        w.add_rope_dimension_sections(rope_sections)
    w.add_rope_freq_base(_ROPE_BASE[arch] if rope_freq_base is None else float(rope_freq_base))
    if step35:
        w.add_rope_freq_base_swa(STEP35_SWA_ROPE_BASE)
    w.add_layer_norm_rms_eps(_RMS_EPS[arch])
    if arch in ("qwen35moe", "glm4moe", "step35"):
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
    if arch in ("qwen3", *HYBRID, "step35") or head_dim != n_embd // n_head:
        # the converter writes these from config.json's head_dim (Qwen3 and Qwen3.5 always have one);
        # llama.cpp otherwise derives head_dim as n_embd / n_head
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(_FILE_TYPE[gq])
    if hybrid:
        # the keys Qwen2MoeModel, _QwenMtpMixin and Qwen3NextModel.set_gguf_parameters add, in their order
        if arch == "qwen35moe":
            w.add_expert_feed_forward_length(n_ff_exp)
            w.add_expert_shared_feed_forward_length(n_ff_shexp)
        if mtp:
            w.add_nextn_predict_layers(1)
        w.add_ssm_conv_kernel(ssm_d_conv)
        w.add_ssm_state_size(ssm_d_state)
        w.add_ssm_group_count(ssm_n_group)
        w.add_ssm_time_step_rank(ssm_dt_rank)
        w.add_ssm_inner_size(ssm_d_state * ssm_dt_rank)
        if recurrent_layers_key:
            recurrent = [(i + 1) % full_attention_interval != 0 for i in range(n_layer)] + [False] * (n_block - n_layer)
            w.add_array(f"{arch}.attention.recurrent_layers", recurrent)
        w.add_full_attention_interval(full_attention_interval)
        w.add_rope_dimension_count(n_rot)
    if arch == "glm4moe":
        # the keys Glm4MoeModel.set_gguf_parameters adds, in its order
        w.add_rope_dimension_count(n_rot)
        w.add_expert_feed_forward_length(n_ff_exp)
        w.add_expert_shared_count(n_expert_shared)
        w.add_leading_dense_block_count(n_dense_lead)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(expert_weights_scale)
        w.add_expert_weights_norm(True)
        if mtp:
            w.add_nextn_predict_layers(1)
    if step35:
        # the keys Step35Model.set_gguf_parameters adds, in its order (no rope.dimension_count: full layers
        # rotate head_dim / 2, sliding ones head_dim)
        w.add_sliding_window(n_swa)
        w.add_sliding_window_pattern(swa)
        w.add_expert_feed_forward_length(n_ff_exp)
        w.add_expert_shared_feed_forward_length(n_ff_shexp)
        w.add_expert_weights_scale(expert_weights_scale)
        w.add_expert_weights_norm(True)
        w.add_leading_dense_block_count(n_dense_lead)
        w.add_moe_every_n_layers(1)
        limit = float(swiglu_limit)
        w.add_swiglu_clamp_exp([limit if 2 <= il < n_layer else 0.0 for il in range(n_block)])
        w.add_swiglu_clamp_shexp([limit if il in (0, 3) and il < n_layer else 0.0 for il in range(n_block)])
        if mtp:
            w.add_nextn_predict_layers(n_mtp)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if callable(vocab):
        n_vocab = vocab(w)
    else:
        n_vocab = _write_bytes_vocab(w) if vocab == "bytes" else _copy_vocab(w, str(vocab))
    if arch == "llama":
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(head_dim)

    # ---- the tensors: the architecture's own table (what the loader reads), each made by _Makers' rule for
    # its name; makers yield float32 row chunks
    glm = arch == "glm4moe"
    if rope_freqs and arch not in ("qwen3", "qwen2", "llama", "step35"):
        raise ValueError(f"make-tiny: rope_freqs is for the dense architectures, not {arch}")
    view = _WrittenFile(w, arch, path, tied=tied, mtp=mtp, mtp_own_head=mtp_own_head,
                        qk_norm=(glm or step35) and qk_norm, rope_freqs=rope_freqs,
                        qkv_bias=arch == "qwen2" or glm and qkv_bias,
                        shared_expert=bool(n_ff_shexp) if arch == "qwen35moe" else glm and n_expert_shared > 0,
                        moe_from=n_dense_lead if step35 else None)
    a = ARCHITECTURES[arch]
    hp = a.hparams(view)
    makers = _Makers(arch, hp, n_layer, tied, output_gain, rng, expert_weights_scale if glm or step35 else 0.0)
    tensors = []
    table = a.tensor_table(hp, view, mtp)
    if weights is not None and set(weights) != set(table):
        raise ValueError(f"make-tiny: weights differ from the tensor table: missing {sorted(set(table) - set(weights))}, "
                         f"extra {sorted(set(weights) - set(table))}")
    for tname, (ne, types) in table.items():
        qt = QT.F32 if types == F32_ONLY or tname.endswith(KEEP_F32) else gq
        shape = tuple(reversed(ne))
        if weights is None:
            maker = makers.maker(tname, shape)
        else:
            given = np.asarray(weights[tname], np.float32)
            if given.shape != shape:
                raise ValueError(f"make-tiny: {tname} has shape {list(given.shape)}, the table {list(shape)}")
            maker = (lambda rows=given.reshape(-1, shape[-1]): iter([rows]))
        tensors.append((tname, shape, qt, maker))

    for name, shape, qt, _ in tensors:
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(shape[-1], qt)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())  # tensor data starts aligned
    for name, shape, qt, maker in tensors:
        written = 0
        for chunk in maker():
            data = quantize(chunk, qt)
            data.tofile(fout)
            written += data.nbytes
        w.write_padding(fout, written)  # each tensor's data is padded to the alignment
    w.close()
    return path


class _WrittenFile(Metadata):
    """The metadata make_tiny has written, read back the way the loader reads a file (ModelFile's key, has,
    arch, path), and which optional tensors it will write: the architecture's tensor table for this view is
    then exactly the list of tensors to write."""

    def __init__(self, writer, arch: str, path, *, tied: bool, mtp: bool, mtp_own_head: bool, qk_norm: bool,
                 qkv_bias: bool, shared_expert: bool, rope_freqs: bool = False, moe_from: int | None = None):
        self.arch, self.path = arch, Path(path)
        self.meta = {k: v.value for k, v in writer.kv_data[0].items()}
        self._tied, self._mtp, self._own_head = tied, mtp, mtp_own_head
        self._qk_norm, self._qkv_bias, self._shared_expert = qk_norm, qkv_bias, shared_expert
        self._rope_freqs = rope_freqs
        self._moe_from = moe_from  # step35: layers from this one on have routed experts

    def has(self, name: str) -> bool:
        if name == "output.weight":
            return not self._tied
        if name == "rope_freqs.weight":
            return self._rope_freqs
        if name.endswith(("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")):
            return self._mtp and self._own_head
        if ".nextn." in name:
            return self._mtp
        if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            return self._qk_norm
        if name.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias")):
            return self._qkv_bias
        if name.endswith("ffn_up_shexp.weight"):
            return self._shared_expert
        if self._moe_from is not None:  # step35: what llama.cpp reads each layer's kind from
            if name.endswith(".ffn_gate_inp.weight"):
                return int(name.split(".")[1]) >= self._moe_from
            if name.endswith(".attn_gate.weight"):
                return True
        return False


class _Makers:
    """The values of every tensor, by its name (see the module docstring for the peaky-logit scheme). Scales
    keep every branch at about `branch` RMS: attention output averages v rows (its RMS shrinks with the
    positions mixed; 2x makes up part), times sigmoid(gate) (RMS ~0.55) in gated attention; silu(g) * u of
    unit-RMS g, u and the gated RMSNorm output have RMS ~0.6; a routed mix and a shared expert share the
    branch. Router logits have RMS 3, so top-k choices are far from ties and float noise does not flip them.

    Gated DeltaNet: decays exp(-softplus(alpha + dt) * A) with A in [0.05, 1] stay in ~[0.5, 0.97], so the
    delta-rule state remembers several tokens and chained calls must carry it.

    The MTP block: eh_proj = [identity | 0] + noise of RMS 0.3, so its residual stream starts as the enormed
    embedding of the token it is given, and the shared head then drafts that token's successor as the trunk
    would (peaky draft logits), while the trunk's hidden state, the MTP attention and FFN move them by ~1.
    Its own embed_tokens / shared_head_head (mtp_own_head) are the trunk's plus noise / 1.25x the trunk's
    head: led by the same tokens, but told apart from them."""

    def __init__(self, arch: str, hp, n_layer: int, tied: bool, output_gain: float, rng, experts_scale: float):
        self.arch, self.hp, self.tied, self.gain, self.rng = arch, hp, tied, output_gain, rng
        self.n_embd, self.n_vocab = hp.n_embd, hp.n_vocab
        self.branch = BRANCH_RMS / np.sqrt(2 * n_layer)  # each of the 2*n_layer branches; they add up
        self.gated = arch in HYBRID or arch == "step35"  # step35: the head-wise gate
        # the tied head is token_embd itself (self-prediction, logit ~ |e|^2): output_norm sets its scale
        self.out_norm_center = output_gain / np.sqrt(hp.n_embd) if tied else 1.0
        self._embd = None  # token_embd, kept for an untied head
        self.experts_scale = experts_scale  # the routed weights' expert_weights_scale (0: none)

    def gaussian(self, name, n_rows, n_cols, rms):
        """Entries N(0, rms^2 / n_cols): x @ W.T of a unit-RMS x has entries of RMS `rms`."""
        g = self.rng(name)
        std = np.float32(rms / np.sqrt(n_cols))
        step = max(1, (1 << 23) // n_cols)
        for r0 in range(0, n_rows, step):
            yield g.standard_normal((min(step, n_rows - r0), n_cols), dtype=np.float32) * std

    def norm_weight(self, name, n, center=1.0):
        g = self.rng(name)
        yield (center * (1.0 + 0.1 * g.standard_normal(n, dtype=np.float32))).astype(np.float32)[None, :]

    def uniform(self, name, n, lo, hi):
        yield self.rng(name).uniform(lo, hi, n).astype(np.float32)[None, :]

    def embedding(self, name):
        # unit-RMS rows, the scale RMSNorm gives the residual stream; kept when the untied head needs it
        chunks = []
        for c in self.gaussian(name, self.n_vocab, self.n_embd, np.sqrt(self.n_embd)):
            if not self.tied:
                chunks.append(c)
            yield c
        if not self.tied:
            self._embd = np.concatenate(chunks)

    def head(self, name):
        # row v = embedding of token follow[v], scaled: after token t comes the v with follow[v] == t
        e = self._embd if self._embd is not None else self.trunk_embedding()
        self._embd = None
        follow = self.rng(name).permutation(self.n_vocab)
        scale = np.float32(self.gain / np.sqrt(self.n_embd))
        step = max(1, (1 << 23) // self.n_embd)
        for r0 in range(0, self.n_vocab, step):
            yield e[follow[r0 : r0 + step]] * scale

    def trunk_embedding(self):
        return np.concatenate(list(self.gaussian("token_embd.weight", self.n_vocab, self.n_embd, np.sqrt(self.n_embd))))

    def eh_proj(self, name):
        row0 = 0
        for c in self.gaussian(name, self.n_embd, 2 * self.n_embd, 0.3):
            r = np.arange(c.shape[0])
            c[r, row0 + r] += 1.0
            row0 += c.shape[0]
            yield c

    def own_embed(self, name):
        noise = self.gaussian(name, self.n_vocab, self.n_embd, 0.3 * np.sqrt(self.n_embd))
        yield self.trunk_embedding() + np.concatenate(list(noise))

    def own_head(self, name):
        e = self.trunk_embedding()
        if self.tied:
            yield e * np.float32(1.25)
        else:
            follow = self.rng("output.weight").permutation(self.n_vocab)
            yield e[follow] * np.float32(1.25 * self.gain / np.sqrt(self.n_embd))

    def _down_exps_rms(self) -> float:
        scale = self.experts_scale
        return self.branch / 0.6 / np.sqrt(2) / (1.0 if scale in (0.0, 1.0) else scale)

    def maker(self, name: str, shape: tuple[int, ...]):
        """A no-argument callable yielding the float32 row chunks of tensor `name` (numpy shape `shape`)."""
        rows, cols = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
        if name == "token_embd.weight":
            return lambda: self.embedding(name)
        if name == "output.weight":
            return lambda: self.head(name)
        special = {
            "nextn.eh_proj.weight": self.eh_proj,
            "nextn.embed_tokens.weight": self.own_embed,
            "nextn.shared_head_head.weight": self.own_head,
        }
        for suffix, fn in special.items():
            if name.endswith(suffix):
                return lambda: fn(name)
        if name in ("output_norm.weight",) or name.endswith("nextn.shared_head_norm.weight"):
            return lambda: self.norm_weight(name, cols, self.out_norm_center)
        if name.endswith(("norm.weight", "nextn.enorm.weight", "nextn.hnorm.weight")):
            return lambda: self.norm_weight(name, cols)
        # rope_freqs: Llama 3.1's divisors run from 1 (fast pairs) to 8 (slow ones)
        uniform = {"rope_freqs.weight": (1.0, 8.0), "ssm_dt.bias": (-0.5, 0.5), "ssm_a": (-1.0, -0.05), "exp_probs_b.bias": (-0.05, 0.05),
                   "attn_q.bias": (-0.1, 0.1), "attn_k.bias": (-0.1, 0.1), "attn_v.bias": (-0.1, 0.1)}
        for suffix, (lo, hi) in uniform.items():
            if name.endswith(suffix):
                return lambda: self.uniform(name, cols, lo, hi)
        rms = 1.0
        if name.endswith("attn_output.weight"):
            rms = 2 * self.branch / (0.55 if self.gated else 1.0)
        elif name.endswith(("ffn_down.weight", "ffn_down_shexp.weight", "ssm_out.weight")):
            rms = self.branch / 0.6
        elif name.endswith("ffn_down_exps.weight"):
            rms = self._down_exps_rms()
        elif name.endswith("ffn_gate_inp.weight"):
            rms = 3.0
        return lambda: self.gaussian(name, rows, cols, rms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="nextn make-tiny", description="Write a random tiny GGUF model from a seed."
    )
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--arch", default="qwen3", choices=ARCHS)
    p.add_argument("--type", default="F32", type=str.upper, choices=TYPES, help="type of every 2-D weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=None,
                   help="default: 2, 4 for qwen35 / qwen35moe / step35, 3 for glm4moe")
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
                   help="default: the arch's (qwen3 1e6, llama 5e5, qwen35 1e7)")
    p.add_argument("--mtp", action="store_true",
                   help="qwen35, qwen35moe, glm4moe, step35: append the MTP (nextn) block (step35: 3 blocks)")
    a = p.parse_args(argv)
    try:
        out = make_tiny(a.out, a.arch, a.type, a.seed, a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.head_dim,
                        a.n_ff, a.n_ctx, a.vocab, a.tied, rope_freq_base=a.rope_freq_base, mtp=a.mtp)
    except (ValueError, OSError) as e:
        print(f"nextn make-tiny: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
