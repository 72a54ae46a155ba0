"""The numpy reference forward: slow, obvious, float64. The oracle the OpenCL engine is checked against.

Reads a GGUF with gguf-py, dequantizes every tensor with gguf.quants.dequantize, and runs the model the
way the architecture's papers and llama.cpp's graphs describe it, one operation per line.
"""

import gguf
import numpy as np

from nextn.gguf.metadata import metadata_dict


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, n_rot, neox, base, scale=1.0):
    """x [n_tokens, n_head, head_dim]; rotates the first n_rot dims of each head."""
    x = x.copy()
    half = n_rot // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    theta = (np.asarray(pos, dtype=np.float64)[:, None] * scale) * inv[None, :]  # [n_tokens, half]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if neox:  # pairs (i, i + n_rot/2)
        a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
        x[..., :half] = a * cos - b * sin
        x[..., half:n_rot] = a * sin + b * cos
    else:  # adjacent pairs (2i, 2i+1)
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2] = a * cos - b * sin
        x[..., 1:n_rot:2] = a * sin + b * cos
    return x


def silu(x):
    return x / (1.0 + np.exp(-x))


class ReferenceModel:
    """Dense llama / qwen3 forward with its own KV cache so calls can be chained."""

    def __init__(self, path):
        r = gguf.GGUFReader(str(path), "r")
        self.meta = m = metadata_dict(r)
        self.arch = a = m["general.architecture"]
        self.t = {}
        for t in r.tensors:
            qt = gguf.GGMLQuantizationType(int(t.tensor_type))
            w = gguf.quants.dequantize(np.array(t.data), qt).astype(np.float64)
            self.t[t.name] = w.reshape([int(x) for x in reversed(t.shape)])
        self.n_embd = m[f"{a}.embedding_length"]
        self.n_layer = m[f"{a}.block_count"]
        self.n_head = m[f"{a}.attention.head_count"]
        self.n_head_kv = m.get(f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = m.get(f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.n_rot = m.get(f"{a}.rope.dimension_count", self.head_dim)
        self.base = m.get(f"{a}.rope.freq_base", 10000.0)
        self.eps = m[f"{a}.attention.layer_norm_rms_epsilon"]
        self.neox = a == "qwen3"
        self.qk_norm = a == "qwen3"
        self.output = self.t.get("output.weight", self.t["token_embd.weight"])
        self.k_cache = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]
        self.v_cache = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]

    def forward(self, tokens, start_pos=0):
        """Logits [len(tokens), n_vocab] of tokens at positions start_pos...; earlier positions must be cached."""
        t, hd, H, Hkv = self.t, self.head_dim, self.n_head, self.n_head_kv
        n = len(tokens)
        pos = np.arange(start_pos, start_pos + n)
        x = t["token_embd.weight"][np.asarray(tokens)]  # [n, n_embd]
        for il in range(self.n_layer):
            b = f"blk.{il}."
            cur = rms_norm(x, t[b + "attn_norm.weight"], self.eps)
            q = (cur @ t[b + "attn_q.weight"].T).reshape(n, H, hd)
            k = (cur @ t[b + "attn_k.weight"].T).reshape(n, Hkv, hd)
            v = (cur @ t[b + "attn_v.weight"].T).reshape(n, Hkv, hd)
            if self.qk_norm:
                q = rms_norm(q, t[b + "attn_q_norm.weight"], self.eps)
                k = rms_norm(k, t[b + "attn_k_norm.weight"], self.eps)
            q = rope(q, pos, self.n_rot, self.neox, self.base)
            k = rope(k, pos, self.n_rot, self.neox, self.base)
            K = np.concatenate([self.k_cache[il][:start_pos], k])  # [n_kv, Hkv, hd]
            V = np.concatenate([self.v_cache[il][:start_pos], v])
            self.k_cache[il], self.v_cache[il] = K, V
            out = np.zeros((n, H, hd))
            for h in range(H):
                g = h // (H // Hkv)
                s = q[:, h, :] @ K[:, g, :].T / np.sqrt(hd)  # [n, n_kv]
                s = np.where(np.arange(len(K))[None, :] <= pos[:, None], s, -np.inf)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                out[:, h, :] = p @ V[:, g, :]
            x = x + out.reshape(n, H * hd) @ t[b + "attn_output.weight"].T
            cur = rms_norm(x, t[b + "ffn_norm.weight"], self.eps)
            ff = silu(cur @ t[b + "ffn_gate.weight"].T) * (cur @ t[b + "ffn_up.weight"].T)
            x = x + ff @ t[b + "ffn_down.weight"].T
        x = rms_norm(x, t["output_norm.weight"], self.eps)
        return x @ self.output.T

    def greedy(self, prompt, n):
        """n greedy tokens after `prompt` (the first from the prompt's last logits)."""
        logits = self.forward(list(prompt), 0)
        out, pos = [int(np.argmax(logits[-1]))], len(prompt)
        while len(out) < n:
            logits = self.forward([out[-1]], pos)
            out.append(int(np.argmax(logits[-1])))
            pos += 1
        return out
