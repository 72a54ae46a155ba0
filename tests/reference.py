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

RoPE modes (ggml's names): "norm" rotates adjacent pairs (x[2i], x[2i+1]) - llama, whose q/k rows
llama.cpp's converter permutes into that order; "neox" rotates (x[i], x[i + n_rot/2]) - qwen2/qwen3.
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from nextn.gguf.metadata import metadata_dict


@dataclass(frozen=True)
class ArchSpec:
    rope: str  # "norm" | "neox"
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm)


ARCHS = {
    "llama": ArchSpec(rope="norm", qk_norm=False),
    "qwen3": ArchSpec(rope="neox", qk_norm=True),
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
        self.n_head = int(key("attention.head_count"))
        self.n_head_kv = int(key("attention.head_count_kv", self.n_head))
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
        self.reset()

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
        q = (cur @ w[b + "attn_q.weight"].T).reshape(n, self.n_head, self.n_embd_head_k)
        k = (cur @ w[b + "attn_k.weight"].T).reshape(n, self.n_head_kv, self.n_embd_head_k)
        v = (cur @ w[b + "attn_v.weight"].T).reshape(n, self.n_head_kv, self.n_embd_head_v)
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
