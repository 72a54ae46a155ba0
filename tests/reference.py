"""The numpy reference forward: slow, obvious, float64. The oracle the OpenCL engine is checked against.

`ReferenceModel(path)` reads a GGUF with gguf-py, dequantizes every tensor with gguf.quants.dequantize
(so the oracle sees exactly the weights the engine's kernels must reproduce), and runs the model the way
llama.cpp's graphs do (src/models/<arch>.cpp), one operation per line, in float64.

    ref = ReferenceModel("tiny.gguf")
    logits = ref.forward(prompt_ids)           # [len(prompt), n_vocab]; fills the KV cache
    logits = ref.forward([next_id], len(prompt))  # chained: one more position
    ids = ref.greedy(prompt_ids, 16)           # starts from an empty cache

The KV cache holds every position computed so far; `forward(tokens, start_pos)` with start_pos below the
cached length drops the positions from start_pos on first (a rollback, as speculative decoding does).

Adding an architecture: give it an entry in ARCHS (its RoPE mode, whether it has per-head q/k norms) or, for
a different layer structure (qwen35's gated delta-net, MoE FFNs), its own block method chosen per layer in
`_layer`; the shared pieces (rms_norm, rope, attention, swiglu) are module functions.

qwen35 / qwen35moe files get a HybridReferenceModel (ReferenceModel.__new__ picks it): Gated DeltaNet layers
with conv and delta-rule state kept per position, gated full attention with interleaved M-RoPE, dense or MoE
FFNs, and `mtp_forward(hidden, next_token, pos)` for the MTP block; see its docstring.

RoPE modes (ggml's names): "norm" rotates adjacent pairs (x[2i], x[2i+1]) - llama, whose q/k rows
llama.cpp's converter permutes into that order; "neox" rotates (x[i], x[i + n_rot/2]) - qwen2/qwen3.
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from nextn.gguf.metadata import metadata_dict

# the Gated DeltaNet math (causal conv1d with state, gates, the gated delta rule, gated RMSNorm) is shared with
# the kernel tests: one copy, in tests/delta_net_reference.py
from delta_net_reference import delta_net, gated_rms_norm, gates, ssm_conv


@dataclass(frozen=True)
class ArchSpec:
    rope: str  # "norm" | "neox"
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm)


ARCHS = {
    "llama": ArchSpec(rope="norm", qk_norm=False),
    "qwen3": ArchSpec(rope="neox", qk_norm=True),
    "qwen2": ArchSpec(rope="neox", qk_norm=False),  # q/k/v biases (read from the file)
    # hybrids: interleaved M-RoPE (rope_multi), run by HybridReferenceModel
    "qwen35": ArchSpec(rope="imrope", qk_norm=True),
    "qwen35moe": ArchSpec(rope="imrope", qk_norm=True),
    # q/k norms when the file has them; run by Glm4MoeReferenceModel
    "glm4moe": ArchSpec(rope="neox", qk_norm=False),
    # per-layer heads, sliding-window layers, head-wise gate, chained MTP blocks; run by Step35ReferenceModel
    "step35": ArchSpec(rope="neox", qk_norm=False),
}


# ------------------------------------------------------------------------------------------ building blocks


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] normalized over its last axis, times w [n] (ggml_rms_norm then ggml_mul)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, mode: str, freq_base: float, freq_scale: float = 1.0,
         freq_factors: np.ndarray | None = None) -> np.ndarray:
    """x [n_tokens, n_head, head_dim] rotated at positions pos [n_tokens]; dims >= n_rot pass through.

    theta_i = pos * freq_scale * freq_base^(-2i/n_rot) / freq_factors[i], i < n_rot/2 (ggml_rope_ext).
    """
    half = n_rot // 2
    inv_freq = freq_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors[:half]
    theta = np.asarray(pos, dtype=np.float64)[:, None] * freq_scale * inv_freq[None, :]  # [n_tokens, half]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]  # [n_tokens, 1, half]
    out = x.astype(np.float64, copy=True)
    if mode == "neox":
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_rot] = a * sin + b * cos
    elif mode == "norm":
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float) -> np.ndarray:
    """Causal GQA attention. q [n, n_head, d_k], k [n_kv, n_head_kv, d_k], v [n_kv, n_head_kv, d_v] where
    k/v hold positions 0..n_kv-1 and q is at positions q_pos [n]. Returns [n, n_head, d_v]."""
    n, n_head, _ = q.shape
    n_kv, n_head_kv, d_v = v.shape
    group = n_head // n_head_kv  # query heads per kv head: head h reads kv head h // group
    mask = np.arange(n_kv)[None, :] <= np.asarray(q_pos)[:, None]  # [n, n_kv]
    out = np.empty((n, n_head, d_v))
    for h in range(n_head):
        g = h // group
        s = (q[:, h, :] @ k[:, g, :].T) * scale  # [n, n_kv]
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ v[:, g, :]
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu_ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """down(silu(gate x) * up x): x [n, n_embd], gate/up [n_ff, n_embd], down [n_embd, n_ff]."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


# ------------------------------------------------------------------------------------------------- model


class ReferenceModel:
    """A GGUF model run in float64 numpy, with its own KV cache so calls can be chained."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        reader = gguf.GGUFReader(str(self.path), "r")
        self.meta = meta = metadata_dict(reader)
        self.arch = arch = meta["general.architecture"]
        if arch not in ARCHS:
            have = ", ".join(sorted(ARCHS))
            raise ValueError(f"reference forward: architecture {arch!r} not implemented (have {have})")
        self.spec = ARCHS[arch]

        # every tensor dequantized to float32 (upcast to float64 where it is used), numpy shape = reversed ne
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            shape = [int(n) for n in reversed(t.shape)]
            data = gguf.quants.dequantize(np.array(t.data), qtype)
            self.w[t.name] = np.asarray(data, np.float32).reshape(shape)

        def key(name, default=None):
            v = meta.get(f"{arch}.{name}", default)
            if v is None:
                raise ValueError(f"{self.path}: metadata key {arch}.{name} missing")
            return v

        self.n_embd = int(key("embedding_length"))
        self.n_layer = int(key("block_count"))
        self.n_head = int(np.atleast_1d(key("attention.head_count"))[0])  # step35: per layer (its _init_arch)
        self.n_head_kv = int(np.atleast_1d(key("attention.head_count_kv", self.n_head))[0])
        self.n_embd_head_k = int(key("attention.key_length", self.n_embd // self.n_head))
        self.n_embd_head_v = int(key("attention.value_length", self.n_embd_head_k))
        self.n_rot = int(key("rope.dimension_count", self.n_embd_head_k))
        self.freq_base = float(key("rope.freq_base", 10000.0))
        self.eps = float(key("attention.layer_norm_rms_epsilon"))
        self.n_ctx_train = int(key("context_length", 0))
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling == "linear":
            self.freq_scale = 1.0 / float(key("rope.scaling.factor"))
        elif scaling == "none":
            self.freq_scale = 1.0
        else:
            raise ValueError(f"reference forward: rope scaling {scaling!r} not implemented")
        self.rope_freqs = self.w.get("rope_freqs.weight")  # llama3-style per-dimension frequency divisors
        self.tok_embd = self.w["token_embd.weight"]  # [n_vocab, n_embd]
        self.n_vocab = self.tok_embd.shape[0]
        # llama.cpp falls back to the token embedding when the file has no output.weight (tied weights)
        self.output = self.w.get("output.weight", self.tok_embd)  # [n_vocab, n_embd]
        self.trace: dict[str, np.ndarray] | None = None  # set to {} to record intermediates (llama.cpp names)
        self._init_arch()
        self.reset()

    def __new__(cls, path: "str | Path"):
        # a hybrid (qwen35 / qwen35moe) file gets the subclass with recurrent state and the MTP block
        if cls is ReferenceModel:
            from nextn.gguf.metadata import read_metadata

            arch = read_metadata(str(path)).get("general.architecture")
            if arch in HYBRID_ARCHS:
                cls = HybridReferenceModel
            elif arch == "glm4moe":
                cls = Glm4MoeReferenceModel
            elif arch == "step35":
                cls = Step35ReferenceModel
        return super().__new__(cls)

    def _init_arch(self) -> None:
        """Hook for architecture-specific hyperparameters, run before the first reset()."""

    # ------------------------------------------------------------------------------------------ cache

    def reset(self) -> None:
        """Empty the KV cache."""
        self.k_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_k)) for _ in range(self.n_layer)]
        self.v_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_v)) for _ in range(self.n_layer)]

    @property
    def n_past(self) -> int:
        """Positions held in the KV cache."""
        return self.k_cache[0].shape[0]

    # ---------------------------------------------------------------------------------------- forward

    def _cb(self, name: str, il: int, value: np.ndarray) -> None:
        if self.trace is not None:
            self.trace[f"{name}-{il}" if il >= 0 else name] = value

    def forward(self, tokens, start_pos: int = 0) -> np.ndarray:
        """Logits [len(tokens), n_vocab] (float64) of tokens at positions start_pos, start_pos+1, ...

        Positions before start_pos must be in the cache; cached positions from start_pos on are dropped.
        """
        tokens = np.asarray(list(tokens), dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("forward needs a non-empty list of token ids")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range 0..{self.n_vocab - 1}")
        if not 0 <= start_pos <= self.n_past:
            raise ValueError(f"start_pos {start_pos} but only {self.n_past} positions are cached")
        for il in range(self.n_layer):  # rollback
            self.k_cache[il] = self.k_cache[il][:start_pos]
            self.v_cache[il] = self.v_cache[il][:start_pos]
        pos = np.arange(start_pos, start_pos + len(tokens))

        x = self.tok_embd[tokens].astype(np.float64)  # [n, n_embd]
        for il in range(self.n_layer):
            x = self._layer(il, x, pos)
        x = rms_norm(x, self.w["output_norm.weight"], self.eps)  # [n, n_embd]
        self._cb("result_norm", -1, x)
        logits = x @ self.output.T  # [n, n_vocab]
        self._cb("result_output", -1, logits)
        return logits

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """One block: pre-norm attention then pre-norm SwiGLU FFN, each added to the residual stream."""
        x = x + self._attention_block(il, x, pos)  # [n, n_embd]
        self._cb("ffn_inp", il, x)
        x = x + self._ffn_block(il, x)  # [n, n_embd]
        self._cb("l_out", il, x)
        return x

    def _attention_block(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        w, b, n = self.w, f"blk.{il}.", len(x)
        cur = rms_norm(x, w[b + "attn_norm.weight"], self.eps)  # [n, n_embd]
        self._cb("attn_norm", il, cur)
        q, k, v = (cur @ w[b + f"attn_{x}.weight"].T + w.get(b + f"attn_{x}.bias", 0.0) for x in "qkv")
        q = q.reshape(n, self.n_head, self.n_embd_head_k)
        k = k.reshape(n, self.n_head_kv, self.n_embd_head_k)
        v = v.reshape(n, self.n_head_kv, self.n_embd_head_v)
        if self.spec.qk_norm:
            q = rms_norm(q, w[b + "attn_q_norm.weight"], self.eps)  # per head, over head_dim
            k = rms_norm(k, w[b + "attn_k_norm.weight"], self.eps)
            self._cb("Qcur_normed", il, q)
            self._cb("Kcur_normed", il, k)
        q = rope(q, pos, self.n_rot, self.spec.rope, self.freq_base, self.freq_scale, self.rope_freqs)
        k = rope(k, pos, self.n_rot, self.spec.rope, self.freq_base, self.freq_scale, self.rope_freqs)
        self._cb("Qcur", il, q)
        self._cb("Kcur", il, k)
        self._cb("Vcur", il, v)
        self.k_cache[il] = np.concatenate([self.k_cache[il], k])  # [n_past + n, n_head_kv, d_k]
        self.v_cache[il] = np.concatenate([self.v_cache[il], v])
        att = attention(q, self.k_cache[il], self.v_cache[il], pos, 1.0 / np.sqrt(self.n_embd_head_k))
        out = att.reshape(n, self.n_head * self.n_embd_head_v) @ w[b + "attn_output.weight"].T  # [n, n_embd]
        self._cb("attn_out", il, out)
        return out

    def _ffn_block(self, il: int, x: np.ndarray) -> np.ndarray:
        w, b = self.w, f"blk.{il}."
        cur = rms_norm(x, w[b + "ffn_norm.weight"], self.eps)  # [n, n_embd]
        self._cb("ffn_norm", il, cur)
        out = swiglu_ffn(cur, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
        self._cb("ffn_out", il, out)
        return out

    # ----------------------------------------------------------------------------------------- decode

    def greedy(self, prompt_ids, n: int) -> list[int]:
        """n greedy tokens after prompt_ids (the first from the prompt's last logits), from an empty cache."""
        prompt_ids = list(prompt_ids)
        logits = self.forward(prompt_ids, 0)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < n:
            logits = self.forward([out[-1]], len(prompt_ids) + len(out) - 1)
            out.append(int(np.argmax(logits[-1])))
        return out[:n]


# ------------------------------------------------------------------- qwen35 / qwen35moe (hybrid Gated DeltaNet)
#
# Layout and math of llama.cpp's src/models/qwen35.cpp and qwen35moe.cpp (graph, build_layer_attn,
# build_layer_attn_linear, build_layer_ffn, graph_mtp) and delta-net-base.cpp; the loader's hyperparameters
# from their load_arch_hparams. Layer il < n_layer is linear attention (Gated DeltaNet) when
# {arch}.attention.recurrent_layers[il] is true, or, without that array, when (il + 1) % full_attention_interval
# != 0; the block after the trunk (il = n_layer, when {arch}.nextn_predict_layers = 1) is the MTP block.

HYBRID_ARCHS = ("qwen35", "qwen35moe")


def rope_multi(x: np.ndarray, pos: np.ndarray, n_rot: int, sections, freq_base: float, freq_scale: float = 1.0,
               interleaved: bool = True) -> np.ndarray:
    """ggml_rope_multi (M-RoPE, NEOX pair order) of x [n_tokens, n_head, head_dim] at positions pos [n_tokens, 4]
    (channels t, h, w, e). Pair i < n_rot/2 turns by pos[channel(i)] * freq_base^(-2i/n_rot), the channel
    chosen by sections [4] as ggml_mrope_cache_init does: interleaved (IMROPE, qwen35) takes sector
    s = i % sum(sections) to t/h/w by s % 3 while s < 3 * that section, else e.

    Text tokens get positions [p, p, p, 0] (llama_batch_allocr), so with sections that leave no rotated pair
    on e (as Qwen3.5's [11, 11, 10, 0] for n_rot 64) this is plain NEOX RoPE at p."""
    half = n_rot // 2
    total = int(sum(sections))
    chan = np.empty(half, dtype=np.int64)
    for i in range(half):
        s = i % total
        if interleaved:
            if s % 3 == 1 and s < 3 * sections[1]:
                chan[i] = 1
            elif s % 3 == 2 and s < 3 * sections[2]:
                chan[i] = 2
            elif s % 3 == 0 and s < 3 * sections[0]:
                chan[i] = 0
            else:
                chan[i] = 3
        else:
            bounds = np.cumsum(sections)
            chan[i] = int(np.searchsorted(bounds, s, side="right"))
    pos = np.asarray(pos, dtype=np.float64)  # [n, 4]
    inv_freq = freq_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    theta = pos[:, chan] * freq_scale * inv_freq[None, :]  # [n, half]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.astype(np.float64, copy=True)
    a, b = x[..., :half], x[..., half:n_rot]
    out[..., :half] = a * cos - b * sin
    out[..., half:n_rot] = a * sin + b * cos
    return out


def text_positions(pos: np.ndarray) -> np.ndarray:
    """[n] text positions -> the [n, 4] M-RoPE positions llama.cpp gives text tokens: [p, p, p, 0]."""
    pos = np.asarray(pos)
    return np.stack([pos, pos, pos, np.zeros_like(pos)], axis=1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def moe_ffn(x: np.ndarray, gate_inp: np.ndarray, gate_exps: np.ndarray, up_exps: np.ndarray,
            down_exps: np.ndarray, n_used: int, w_scale: float = 0.0) -> np.ndarray:
    """build_moe_ffn with softmax gating and normalized weights (qwen35moe): x [n, n_embd], gate_inp
    [n_expert, n_embd], gate/up_exps [n_expert, n_ff_exp, n_embd], down_exps [n_expert, n_embd, n_ff_exp].
    Top-n_used experts by softmax probability, their probabilities divided by their sum (clamped at
    6.103515625e-5, the smallest normal float16), times w_scale unless it is 0 or 1."""
    logits = x @ gate_inp.T  # [n, n_expert]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = np.zeros((len(x), down_exps.shape[1]))
    for t in range(len(x)):
        sel = np.argsort(-probs[t], kind="stable")[:n_used]
        wts = probs[t, sel]
        wts = wts / max(wts.sum(), 6.103515625e-5)
        if w_scale not in (0.0, 1.0):
            wts = wts * w_scale
        for e, we in zip(sel, wts):
            out[t] += we * swiglu_ffn(x[t : t + 1], gate_exps[e], up_exps[e], down_exps[e])[0]
    return out


class MtpMixin:
    """The MTP (NextN) block of Qwen3.5/3.6 and GLM-4.5 (their graph_mtp are the same but for the decoder
    layer, which is the model's own `_layer` at il = n_layer). Needs k_cache / v_cache with an entry at
    n_layer, n_nextn, and the trunk's h_nextn from forward()."""

    @property
    def mtp_n_past(self) -> int:
        """Positions held in the MTP block's KV cache."""
        return self.k_cache[self.n_layer].shape[0] if self.n_nextn else 0

    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(list(np.atleast_1d(tokens)), dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("forward needs a non-empty list of token ids")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range 0..{self.n_vocab - 1}")
        return tokens

    def mtp_forward(self, hidden, next_token, pos: int) -> np.ndarray:
        """Draft logits [n, n_vocab] of the MTP block (llama_model_qwen35{,moe}::graph_mtp).

        hidden [n, n_embd] (or [n_embd]): trunk h_nextn rows of positions pos-1 .. pos+n-2 (output_norm'd
        final hidden states; zeros for position 0); next_token: the n tokens at positions pos .. pos+n-1.
        Row i drafts the token at position pos+i+1. The MTP block keeps its own KV cache: positions before
        pos must be cached (by earlier calls), cached positions from pos on are dropped first.

        concat(enorm(embed(token)), hnorm(hidden)) @ eh_proj, then a full-attention Qwen3.5 block (gated
        attention (GLM: its attention layer), post-attention norm, the arch's FFN), shared_head_norm (else output_norm), and
        shared_head_head (else the trunk's head). nextn.embed_tokens, when present, replaces token_embd."""
        if not self.n_nextn:
            raise ValueError(f"{self.path}: no MTP block (nextn_predict_layers is 0)")
        tokens = self._check_tokens(next_token)
        hidden = np.atleast_2d(np.asarray(hidden, dtype=np.float64))
        if hidden.shape != (len(tokens), self.n_embd):
            raise ValueError(f"hidden must be [{len(tokens)}, {self.n_embd}], got {list(hidden.shape)}")
        il, w = self.n_layer, self.w
        b = f"blk.{il}."
        if not 0 <= pos <= self.mtp_n_past:
            raise ValueError(f"MTP pos {pos} but only {self.mtp_n_past} MTP positions are cached")
        self.k_cache[il] = self.k_cache[il][:pos]
        self.v_cache[il] = self.v_cache[il][:pos]
        positions = np.arange(pos, pos + len(tokens))

        embd = w.get(b + "nextn.embed_tokens.weight", self.tok_embd)
        e_norm = rms_norm(embd[tokens].astype(np.float64), w[b + "nextn.enorm.weight"], self.eps)
        h_norm = rms_norm(hidden, w[b + "nextn.hnorm.weight"], self.eps)
        self._cb("mtp_enorm", il, e_norm)
        self._cb("mtp_hnorm", il, h_norm)
        x = np.concatenate([e_norm, h_norm], axis=1) @ w[b + "nextn.eh_proj.weight"].T  # [n, n_embd]
        self._cb("mtp_eh_proj", il, x)
        x = self._layer(il, x, positions)
        head_norm = w.get(b + "nextn.shared_head_norm.weight", w["output_norm.weight"])
        x = rms_norm(x, head_norm, self.eps)
        self.mtp_h_nextn = x
        self._cb("mtp_shared_head_norm", il, x)
        logits = x @ w.get(b + "nextn.shared_head_head.weight", self.output).T
        self._cb("mtp_result_output", il, logits)
        return logits


class HybridReferenceModel(MtpMixin, ReferenceModel):
    """qwen35 / qwen35moe: Gated DeltaNet and gated full-attention layers, dense or MoE FFNs, and the MTP block.

    ReferenceModel(path) returns one for such a file. Per-model state, chained across calls like the KV cache:
    k_cache / v_cache of the full-attention layers (and of the MTP block at index n_layer), and for each linear
    layer its conv state [d_conv - 1, conv_dim] (the last inputs of the causal conv1d) and its delta-rule state
    [n_v_heads, head_k_dim, head_v_dim] (per head S with o = S^T q, the layout of tests/delta_net_reference.py
    and the kernels; llama.cpp's ssm state buffer, ggml ne [S_v, S_v, H_v], holds the same S with ne0
    indexing d_k and ne1 d_v, i.e. its memory read row-major is [H, d_v, d_k], S transposed per head). The conv state is
    time-major, oldest input first; llama.cpp's r_l buffer holds its transpose (ne [d_conv - 1, conv_dim]).
    Both recurrent states are kept for every position, so
    forward(tokens, start_pos) can roll back to any start_pos <= n_past as it does with the KV cache.

    After forward(), h_nextn [len(tokens), n_embd] holds the trunk's final hidden states after output_norm -
    the rows the LM head multiplies, which llama.cpp's graph also exports as t_h_nextn (the "embeddings_nextn"
    that common/speculative.cpp hands to the MTP head). mtp_forward(hidden, next_token, pos) runs the MTP block
    (graph_mtp): the draft for position pos + 1 from the token at position pos and the h_nextn row of position
    pos - 1 (the catch-up batch pairs each token with the target's h_nextn "shifted right by one", zeros
    before the first decode); its own h_nextn (after shared_head_norm) is left in mtp_h_nextn, which llama.cpp
    feeds back as the hidden state of the next draft step.
    """

    def _init_arch(self) -> None:
        meta, arch = self.meta, self.arch

        def key(name, default=None):
            v = meta.get(f"{arch}.{name}", default)
            if v is None:
                raise ValueError(f"{self.path}: metadata key {arch}.{name} missing")
            return v

        self.n_layer_all = self.n_layer  # block_count counts the MTP block
        self.n_nextn = int(key("nextn_predict_layers", 0))
        if self.n_nextn > 1:
            raise ValueError("reference forward: only one MTP block is implemented (as in llama.cpp)")
        self.n_layer = self.n_layer_all - self.n_nextn
        recr = meta.get(f"{arch}.attention.recurrent_layers")
        if recr is not None:
            self.is_recr = [bool(r) for r in recr][: self.n_layer]
        else:
            interval = int(key("full_attention_interval", 4))
            self.is_recr = [(i + 1) % interval != 0 for i in range(self.n_layer)]
        self.sections = [int(s) for s in key("rope.dimension_sections")]
        self.d_conv = int(key("ssm.conv_kernel"))
        self.d_inner = int(key("ssm.inner_size"))
        self.head_k_dim = int(key("ssm.state_size"))
        self.n_k_heads = int(key("ssm.group_count"))
        self.n_v_heads = int(key("ssm.time_step_rank"))
        self.head_v_dim = self.d_inner // self.n_v_heads
        self.conv_dim = 2 * self.n_k_heads * self.head_k_dim + self.d_inner
        self.moe = arch == "qwen35moe"
        if self.moe:
            self.n_expert_used = int(key("expert_used_count"))
            self.expert_weights_scale = float(key("expert_weights_scale", 0.0))
        self.mtp_h_nextn: np.ndarray | None = None
        self.h_nextn: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ state

    def reset(self) -> None:
        """Empty the KV caches (trunk and MTP) and zero the recurrent states."""
        n_all = self.n_layer_all
        self.k_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_k)) for _ in range(n_all)]
        self.v_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_v)) for _ in range(n_all)]
        # [p] = the state after p positions; [0] is the zero state a fresh sequence starts from
        self.conv_hist = [[np.zeros((self.d_conv - 1, self.conv_dim))] for _ in range(self.n_layer)]
        self.delta_hist = [[np.zeros((self.n_v_heads, self.head_k_dim, self.head_v_dim))]
                           for _ in range(self.n_layer)]
        self._n_past = 0

    @property
    def n_past(self) -> int:
        """Positions the trunk has processed."""
        return self._n_past

    def conv_state(self, il: int) -> np.ndarray:
        return self.conv_hist[il][-1]

    def delta_state(self, il: int) -> np.ndarray:
        return self.delta_hist[il][-1]

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, tokens, start_pos: int = 0) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        if not 0 <= start_pos <= self.n_past:
            raise ValueError(f"start_pos {start_pos} but only {self.n_past} positions are cached")
        for il in range(self.n_layer):  # rollback
            self.k_cache[il] = self.k_cache[il][:start_pos]
            self.v_cache[il] = self.v_cache[il][:start_pos]
            del self.conv_hist[il][start_pos + 1 :]
            del self.delta_hist[il][start_pos + 1 :]
        pos = np.arange(start_pos, start_pos + len(tokens))

        x = self.tok_embd[tokens].astype(np.float64)  # [n, n_embd]
        for il in range(self.n_layer):
            x = self._layer(il, x, pos)
        self._n_past = start_pos + len(tokens)
        x = rms_norm(x, self.w["output_norm.weight"], self.eps)
        self.h_nextn = x
        self._cb("h_nextn", -1, x)
        self._cb("result_norm", -1, x)
        logits = x @ self.output.T
        self._cb("result_output", -1, logits)
        return logits

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """attn_norm -> linear or full attention -> residual; attn_post_norm -> FFN -> residual."""
        w, b = self.w, f"blk.{il}."
        cur = rms_norm(x, w[b + "attn_norm.weight"], self.eps)
        self._cb("attn_norm", il, cur)
        if il < self.n_layer and self.is_recr[il]:
            cur = self._linear_attention(il, cur)
        else:
            cur = self._gated_attention(il, cur, pos)
        x = x + cur
        self._cb("attn_residual", il, x)
        cur = rms_norm(x, w[b + "post_attention_norm.weight"], self.eps)
        self._cb("attn_post_norm", il, cur)
        cur = self._hybrid_ffn(il, cur)
        self._cb("ffn_out", il, cur)
        x = x + cur
        self._cb("l_out", il, x)
        return x

    def _gated_attention(self, il: int, cur: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """build_layer_attn: joint Q+gate projection (per head head_dim q rows, then head_dim gate rows),
        q/k RMSNorm, M-RoPE, causal GQA attention, times sigmoid(gate), output projection."""
        w, b, n, d = self.w, f"blk.{il}.", len(cur), self.n_embd_head_k
        q_full = (cur @ w[b + "attn_q.weight"].T).reshape(n, self.n_head, 2 * d)
        q, gate = q_full[..., :d], q_full[..., d:].reshape(n, self.n_head * d)
        k = (cur @ w[b + "attn_k.weight"].T).reshape(n, self.n_head_kv, d)
        v = (cur @ w[b + "attn_v.weight"].T).reshape(n, self.n_head_kv, self.n_embd_head_v)
        q = rms_norm(q, w[b + "attn_q_norm.weight"], self.eps)
        k = rms_norm(k, w[b + "attn_k_norm.weight"], self.eps)
        self._cb("Qcur_normed", il, q)
        self._cb("Kcur_normed", il, k)
        p4 = text_positions(pos)
        q = rope_multi(q, p4, self.n_rot, self.sections, self.freq_base, self.freq_scale)
        k = rope_multi(k, p4, self.n_rot, self.sections, self.freq_base, self.freq_scale)
        self._cb("Qcur", il, q)
        self._cb("Kcur", il, k)
        self._cb("Vcur", il, v)
        self.k_cache[il] = np.concatenate([self.k_cache[il], k])
        self.v_cache[il] = np.concatenate([self.v_cache[il], v])
        att = attention(q, self.k_cache[il], self.v_cache[il], pos, 1.0 / np.sqrt(d))
        att = att.reshape(n, self.n_head * self.n_embd_head_v)
        self._cb("attn_pregate", il, att)
        out = (att * sigmoid(gate)) @ w[b + "attn_output.weight"].T
        self._cb("attn_output", il, out)
        return out

    def _hybrid_ffn(self, il: int, cur: np.ndarray) -> np.ndarray:
        w, b = self.w, f"blk.{il}."
        if not self.moe:
            return swiglu_ffn(cur, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
        out = moe_ffn(cur, w[b + "ffn_gate_inp.weight"], w[b + "ffn_gate_exps.weight"], w[b + "ffn_up_exps.weight"],
                      w[b + "ffn_down_exps.weight"], self.n_expert_used, self.expert_weights_scale)
        self._cb("ffn_moe_out", il, out)
        if b + "ffn_up_shexp.weight" in w:
            shared = swiglu_ffn(cur, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                w[b + "ffn_down_shexp.weight"])
            shared = shared * sigmoid(cur @ w[b + "ffn_gate_inp_shexp.weight"])[:, None]
            self._cb("ffn_shexp_gated", il, shared)
            out = out + shared
        return out

    def _linear_attention(self, il: int, cur: np.ndarray) -> np.ndarray:
        """build_layer_attn_linear: qkv and z projections, causal conv1d (state carried) + SiLU, split into
        q, k [n_k_heads, head_k_dim] and v [n_v_heads, head_v_dim] per token, L2-normalized q and k, the gated
        delta rule with beta = sigmoid(x W_beta) and log-decay g = softplus(x W_alpha + dt_bias) * ssm_a
        (ssm_a = -exp(A_log)), gated RMSNorm rms_norm(o) * w * silu(z) per value head, output projection.
        Value head h reads key head h % n_k_heads (ggml_repeat tiles the key heads; the converter reorders
        grouped-by-key V heads into that order). The math is tests/delta_net_reference.py's, run one token at
        a time so that the state after every position is kept (for rollback)."""
        w, b, n = self.w, f"blk.{il}.", len(cur)
        hk, hv, dk, dv = self.n_k_heads, self.n_v_heads, self.head_k_dim, self.head_v_dim
        qkv = cur @ w[b + "attn_qkv.weight"].T  # [n, conv_dim]
        z = cur @ w[b + "attn_gate.weight"].T  # [n, hv * dv]
        g, beta = gates(cur @ w[b + "ssm_alpha.weight"].T, cur @ w[b + "ssm_beta.weight"].T,
                        w[b + "ssm_dt.bias"], w[b + "ssm_a"])  # [n, hv] each; g <= 0
        self._cb("linear_attn_qkv_mixed", il, qkv)
        self._cb("beta_sigmoid", il, beta)
        self._cb("gate", il, g)

        conv_w = w[b + "ssm_conv1d.weight"]
        conv_out, o = np.empty_like(qkv), np.empty((n, hv * dv))
        for t in range(n):
            conv_out[t : t + 1], conv_state = ssm_conv(qkv[t : t + 1], conv_w, self.conv_hist[il][-1])
            o[t : t + 1], delta_state = delta_net(conv_out[t : t + 1], g[t : t + 1], beta[t : t + 1],
                                                  self.delta_hist[il][-1], hk, hv, dk, dv, self.eps)
            self.conv_hist[il].append(conv_state)
            self.delta_hist[il].append(delta_state)
        self._cb("conv_output_silu", il, conv_out)
        self._cb("attn_output", il, o.reshape(n, hv, dv))
        out = gated_rms_norm(o.reshape(n * hv, dv), z.reshape(n * hv, dv), w[b + "ssm_norm.weight"], self.eps)
        out = out.reshape(n, hv * dv) @ w[b + "ssm_out.weight"].T
        self._cb("linear_attn_out", il, out)
        return out


# ------------------------------------------------------------------------------------------------ glm4moe
#
# llama.cpp's src/models/glm4-moe.cpp (graph, graph_mtp) and load_arch_hparams: the converter's block_count
# counts the MTP block; layers below leading_dense_block_count have a SwiGLU FFN, the others routed experts
# (build_moe_ffn with sigmoid gating, the exp_probs_b selection bias, weights normalized when
# expert_weights_norm, times expert_weights_scale) plus an ungated shared expert.


def moe_ffn_sigmoid(x: np.ndarray, gate_inp: np.ndarray, bias: np.ndarray, gate_exps: np.ndarray,
                    up_exps: np.ndarray, down_exps: np.ndarray, n_used: int, norm: bool,
                    w_scale: float) -> np.ndarray:
    """build_moe_ffn with LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID and exp_probs_b: p = sigmoid(logits); the top
    n_used experts by p + bias (stable: ties to the lower index); weights p of those (without the bias),
    divided by their sum (clamped at 6.103515625e-5) when norm, times w_scale unless it is 0 or 1."""
    probs = sigmoid(x @ gate_inp.T)  # [n, n_expert]
    out = np.zeros((len(x), down_exps.shape[1]))
    for t in range(len(x)):
        sel = np.argsort(-(probs[t] + bias), kind="stable")[:n_used]
        wts = probs[t, sel]
        if norm:
            wts = wts / max(wts.sum(), 6.103515625e-5)
        if w_scale not in (0.0, 1.0):
            wts = wts * w_scale
        for e, we in zip(sel, wts):
            out[t] += we * swiglu_ffn(x[t : t + 1], gate_exps[e], up_exps[e], down_exps[e])[0]
    return out


class Glm4MoeReferenceModel(MtpMixin, ReferenceModel):
    """glm4moe: attention with q/k/v biases and optional q/k norms, NeoX RoPE over rope.dimension_count dims,
    dense then MoE FFNs, and the MTP block (mtp_forward, as HybridReferenceModel's)."""

    def _init_arch(self) -> None:
        meta, arch = self.meta, self.arch
        self.n_layer_all = self.n_layer
        self.n_nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0))
        if self.n_nextn > 1:
            raise ValueError("reference forward: only one MTP block is implemented (as in llama.cpp)")
        self.n_layer = self.n_layer_all - self.n_nextn
        self.n_dense_lead = int(meta.get(f"{arch}.leading_dense_block_count", 0))
        self.n_expert_used = int(meta[f"{arch}.expert_used_count"])
        self.expert_weights_scale = float(meta.get(f"{arch}.expert_weights_scale", 0.0))
        self.expert_weights_norm = bool(meta.get(f"{arch}.expert_weights_norm", False))
        if int(meta.get(f"{arch}.expert_gating_func", 2)) != 2:
            raise ValueError("reference forward: glm4moe with softmax gating is not implemented")
        self.h_nextn: np.ndarray | None = None
        self.mtp_h_nextn: np.ndarray | None = None

    def reset(self) -> None:
        """Empty the KV caches (trunk and MTP)."""
        self.k_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_k)) for _ in range(self.n_layer_all)]
        self.v_cache = [np.zeros((0, self.n_head_kv, self.n_embd_head_v)) for _ in range(self.n_layer_all)]

    def forward(self, tokens, start_pos: int = 0) -> np.ndarray:
        logits = super().forward(tokens, start_pos)
        self.h_nextn = self._final_norm
        return logits

    def _cb(self, name: str, il: int, value: np.ndarray) -> None:
        if name == "result_norm":  # the trunk's output_norm'd hidden state: the MTP block's input
            self._final_norm = value
        super()._cb(name, il, value)

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        w, b, n, d = self.w, f"blk.{il}.", len(x), self.n_embd_head_k
        cur = rms_norm(x, w[b + "attn_norm.weight"], self.eps)
        self._cb("attn_norm", il, cur)
        q = cur @ w[b + "attn_q.weight"].T
        k = cur @ w[b + "attn_k.weight"].T
        v = cur @ w[b + "attn_v.weight"].T
        if b + "attn_q.bias" in w:
            q, k, v = q + w[b + "attn_q.bias"], k + w[b + "attn_k.bias"], v + w[b + "attn_v.bias"]
        q, k = q.reshape(n, self.n_head, d), k.reshape(n, self.n_head_kv, d)
        v = v.reshape(n, self.n_head_kv, self.n_embd_head_v)
        if b + "attn_q_norm.weight" in w:
            q = rms_norm(q, w[b + "attn_q_norm.weight"], self.eps)
            k = rms_norm(k, w[b + "attn_k_norm.weight"], self.eps)
        q = rope(q, pos, self.n_rot, "neox", self.freq_base, self.freq_scale)
        k = rope(k, pos, self.n_rot, "neox", self.freq_base, self.freq_scale)
        self._cb("Qcur", il, q)
        self._cb("Kcur", il, k)
        self.k_cache[il] = np.concatenate([self.k_cache[il], k])
        self.v_cache[il] = np.concatenate([self.v_cache[il], v])
        att = attention(q, self.k_cache[il], self.v_cache[il], pos, 1.0 / np.sqrt(d))
        x = x + att.reshape(n, self.n_head * self.n_embd_head_v) @ w[b + "attn_output.weight"].T
        self._cb("ffn_inp", il, x)
        cur = rms_norm(x, w[b + "post_attention_norm.weight"], self.eps)
        if il < self.n_dense_lead:
            out = swiglu_ffn(cur, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"])
        else:
            out = moe_ffn_sigmoid(cur, w[b + "ffn_gate_inp.weight"], w[b + "exp_probs_b.bias"],
                                  w[b + "ffn_gate_exps.weight"], w[b + "ffn_up_exps.weight"],
                                  w[b + "ffn_down_exps.weight"], self.n_expert_used, self.expert_weights_norm,
                                  self.expert_weights_scale)
            if b + "ffn_up_shexp.weight" in w:
                out = out + swiglu_ffn(cur, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                       w[b + "ffn_down_shexp.weight"])
        self._cb("ffn_out", il, out)
        x = x + out
        self._cb("l_out", il, x)
        return x


# ------------------------------------------------------------------------------------------------- step35
#
# llama.cpp's src/models/step35.cpp (graph, graph_mtp) and load_arch_hparams, with the generic hparams of
# llama-model.cpp: per-layer head counts; layer il sliding when sliding_window_pattern[il] (it then sees the
# last sliding_window positions, rotates rope.dimension_count_swa dims (default rope.dimension_count, default
# head_dim) at rope.freq_base_swa (default 10000) without rope_freqs), else full (half of rope.dimension_count
# dims at rope.freq_base, angles divided by rope_freqs.weight when present); the head-wise gate; SwiGLU
# limits; MoE where the layer has ffn_gate_inp, with sigmoid routing, exp_probs_b and a shared expert.


def swiglu_limited(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, limit: float) -> np.ndarray:
    """swiglu_ffn, with llama.cpp's limit when > 1e-6: min(silu(gate x), limit) * clip(up x, -limit, limit)."""
    g, u = x @ gate.T, x @ up.T
    a = silu(g)
    if limit > 1e-6:
        a, u = np.minimum(a, limit), np.clip(u, -limit, limit)
    return (a * u) @ down.T


def window_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
                     window: int) -> np.ndarray:
    """attention() where a query at p sees keys j with p - window < j <= p (window 0: all j <= p)."""
    n, n_head, _ = q.shape
    n_kv, n_head_kv, d_v = v.shape
    group = n_head // n_head_kv
    j, p = np.arange(n_kv)[None, :], np.asarray(q_pos)[:, None]
    mask = (j <= p) & ((p - j < window) if window else True)
    out = np.empty((n, n_head, d_v))
    for h in range(n_head):
        s = np.where(mask, (q[:, h, :] @ k[:, h // group, :].T) * scale, -np.inf)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h, :] = (e / e.sum(axis=1, keepdims=True)) @ v[:, h // group, :]
    return out


class Step35ReferenceModel(ReferenceModel):
    """step35: see above. forward() leaves the trunk's final hidden state before output_norm in h_nextn;
    mtp_forward(hidden, tokens, pos, head) runs MTP block `head` (its own KV cache) and leaves its output before
    shared_head_norm in mtp_h_nextn, the hidden input of the next head's draft (llama.cpp's chain_heads)."""

    def _init_arch(self) -> None:
        meta, arch = self.meta, self.arch
        self.n_layer_all = n = self.n_layer
        self.n_nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0))
        self.n_layer = n - self.n_nextn

        def per_layer(key, default):
            v = meta.get(f"{arch}.{key}", default)
            return [x for x in v] if isinstance(v, (list, tuple, np.ndarray)) else [v] * n

        self.heads = [int(x) for x in per_layer("attention.head_count", None)]
        self.heads_kv = [int(x) for x in per_layer("attention.head_count_kv", self.heads)]
        self.swa = [bool(x) for x in meta[f"{arch}.attention.sliding_window_pattern"]]
        self.n_swa = int(meta[f"{arch}.attention.sliding_window"])
        n_rot = int(meta.get(f"{arch}.rope.dimension_count", self.n_embd_head_k))
        self.n_rot_full, self.n_rot_swa = n_rot // 2, int(meta.get(f"{arch}.rope.dimension_count_swa", n_rot))
        self.freq_base_swa = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
        self.clamp_exp = [float(x) for x in per_layer("swiglu_clamp_exp", 0.0)]
        self.clamp_shexp = [float(x) for x in per_layer("swiglu_clamp_shexp", 0.0)]
        self.n_expert_used = int(meta.get(f"{arch}.expert_used_count", 0))
        self.expert_weights_scale = float(meta.get(f"{arch}.expert_weights_scale", 0.0))
        self.expert_weights_norm = bool(meta.get(f"{arch}.expert_weights_norm", False))
        if int(meta.get(f"{arch}.expert_gating_func", 2)) not in (0, 2):
            raise ValueError("reference forward: step35 routes by sigmoid only")
        self.h_nextn: np.ndarray | None = None
        self.mtp_h_nextn: np.ndarray | None = None

    def reset(self) -> None:
        d, dv = self.n_embd_head_k, self.n_embd_head_v
        self.k_cache = [np.zeros((0, self.heads_kv[il], d)) for il in range(self.n_layer_all)]
        self.v_cache = [np.zeros((0, self.heads_kv[il], dv)) for il in range(self.n_layer_all)]

    def forward(self, tokens, start_pos: int = 0) -> np.ndarray:
        tokens = np.asarray(list(tokens), dtype=np.int64)
        if len(tokens) == 0 or tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError("forward needs token ids in range")
        if not 0 <= start_pos <= self.n_past:
            raise ValueError(f"start_pos {start_pos} but only {self.n_past} positions are cached")
        for il in range(self.n_layer):
            self.k_cache[il] = self.k_cache[il][:start_pos]
            self.v_cache[il] = self.v_cache[il][:start_pos]
        pos = np.arange(start_pos, start_pos + len(tokens))
        x = self.tok_embd[tokens].astype(np.float64)
        for il in range(self.n_layer):
            x = self._layer(il, x, pos)
        self.h_nextn = x  # before output_norm
        x = rms_norm(x, self.w["output_norm.weight"], self.eps)
        self._cb("result_norm", -1, x)
        return x @ self.output.T

    def mtp_n_past(self, head: int = 0) -> int:
        return self.k_cache[self.n_layer + head].shape[0]

    def mtp_forward(self, hidden, next_token, pos: int, head: int = 0) -> np.ndarray:
        """Draft logits of MTP block `head` (graph_mtp at nextn_layer_offset head): hidden [n, n_embd] the
        h_nextn rows paired with the n tokens at positions pos..; its KV cache keeps positions < pos."""
        tokens = np.asarray(list(np.atleast_1d(next_token)), dtype=np.int64)
        hidden = np.atleast_2d(np.asarray(hidden, dtype=np.float64))
        if not 0 <= head < self.n_nextn or hidden.shape != (len(tokens), self.n_embd):
            raise ValueError(f"MTP head {head} of {self.n_nextn}, hidden {list(hidden.shape)}")
        il, w = self.n_layer + head, self.w
        b = f"blk.{il}."
        if not 0 <= pos <= self.mtp_n_past(head):
            raise ValueError(f"MTP pos {pos} but only {self.mtp_n_past(head)} positions are cached")
        self.k_cache[il] = self.k_cache[il][:pos]
        self.v_cache[il] = self.v_cache[il][:pos]
        embd = w.get(b + "nextn.embed_tokens.weight", self.tok_embd)
        e_norm = rms_norm(embd[tokens].astype(np.float64), w[b + "nextn.enorm.weight"], self.eps)
        h_norm = rms_norm(hidden, w[b + "nextn.hnorm.weight"], self.eps)
        x = np.concatenate([e_norm, h_norm], axis=1) @ w[b + "nextn.eh_proj.weight"].T
        x = self._layer(il, x, np.arange(pos, pos + len(tokens)))
        self.mtp_h_nextn = x  # before shared_head_norm
        x = rms_norm(x, w.get(b + "nextn.shared_head_norm.weight", w["output_norm.weight"]), self.eps)
        return x @ w.get(b + "nextn.shared_head_head.weight", self.output).T

    def _layer(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        w, b, n, d = self.w, f"blk.{il}.", len(x), self.n_embd_head_k
        nh, nkv, swa = self.heads[il], self.heads_kv[il], self.swa[il]
        cur = rms_norm(x, w[b + "attn_norm.weight"], self.eps)
        q = (cur @ w[b + "attn_q.weight"].T).reshape(n, nh, d)
        k = (cur @ w[b + "attn_k.weight"].T).reshape(n, nkv, d)
        v = (cur @ w[b + "attn_v.weight"].T).reshape(n, nkv, self.n_embd_head_v)
        if b + "attn_q_norm.weight" in w:
            q = rms_norm(q, w[b + "attn_q_norm.weight"], self.eps)
            k = rms_norm(k, w[b + "attn_k_norm.weight"], self.eps)
        n_rot = self.n_rot_swa if swa else self.n_rot_full
        base = self.freq_base_swa if swa else self.freq_base
        scale = 1.0 if swa else self.freq_scale
        factors = None if swa else self.rope_freqs
        q = rope(q, pos, n_rot, "neox", base, scale, factors)
        k = rope(k, pos, n_rot, "neox", base, scale, factors)
        self.k_cache[il] = np.concatenate([self.k_cache[il], k])
        self.v_cache[il] = np.concatenate([self.v_cache[il], v])
        att = window_attention(q, self.k_cache[il], self.v_cache[il], pos, 1.0 / np.sqrt(d),
                               self.n_swa if swa else 0)  # [n, nh, dv]
        if b + "attn_gate.weight" in w:  # head-wise gate
            att = att * sigmoid(cur @ w[b + "attn_gate.weight"].T)[:, :, None]
        x = x + att.reshape(n, nh * self.n_embd_head_v) @ w[b + "attn_output.weight"].T
        self._cb("ffn_inp", il, x)
        cur = rms_norm(x, w[b + "ffn_norm.weight"], self.eps)
        if b + "ffn_gate_inp.weight" not in w:
            out = swiglu_limited(cur, w[b + "ffn_gate.weight"], w[b + "ffn_up.weight"], w[b + "ffn_down.weight"],
                                 self.clamp_shexp[il])
        else:
            probs = sigmoid(cur @ w[b + "ffn_gate_inp.weight"].T)  # [n, n_expert]
            out = np.zeros_like(x)
            for t in range(n):
                sel = np.argsort(-(probs[t] + w[b + "exp_probs_b.bias"]), kind="stable")[:self.n_expert_used]
                wts = probs[t, sel]
                if self.expert_weights_norm:
                    wts = wts / max(wts.sum(), 6.103515625e-5)
                if self.expert_weights_scale not in (0.0, 1.0):
                    wts = wts * self.expert_weights_scale
                for e, we in zip(sel, wts):
                    out[t] += we * swiglu_limited(cur[t : t + 1], w[b + "ffn_gate_exps.weight"][e],
                                                  w[b + "ffn_up_exps.weight"][e], w[b + "ffn_down_exps.weight"][e],
                                                  self.clamp_exp[il])[0]
            out = out + swiglu_limited(cur, w[b + "ffn_gate_shexp.weight"], w[b + "ffn_up_shexp.weight"],
                                       w[b + "ffn_down_shexp.weight"], self.clamp_shexp[il])
        x = x + out
        self._cb("l_out", il, x)
        return x
