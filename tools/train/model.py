"""The qwen35 forward in torch: the engine's math (tests/reference.py's HybridReferenceModel, llama.cpp's
src/models/qwen35.cpp), batched and differentiable, with the weights under their GGUF names.

Weights are kept in numpy orientation (GGUF's ne reversed: a matrix is [n_out, n_in]) and hold exactly what
the file stores (effective RMSNorm gains, ssm_a = -exp(A_log)), so export writes them as they are and the
engine test loads them back unchanged. Per trunk layer:

    x += mixer(attn_norm(x)); x += swiglu(post_attention_norm(x))

where the mixer is Gated DeltaNet (layer il with (il + 1) % full_attention_interval != 0) or gated full
attention; then h = output_norm(x) (llama.cpp's t_h_nextn) and logits = h @ output^T. The MTP block
(blk.{n_layer}) pairs token t_p with h_{p-1} (zeros at p = 0): eh_proj(concat(enorm(embd(t_p)),
hnorm(h_{p-1}))), one gated full-attention layer with its FFN, shared_head_norm, the trunk's head; row p
drafts the token at p + 1, the one the trunk's logits at p predict (the token after next for h_{p-1}).

The Gated DeltaNet recurrence (S *= exp(g); d = beta (v - S^T k); S += k d^T; o = S^T q) runs in the
chunked form (the WY representation: within a chunk a unit lower-triangular solve, across chunks the state);
`delta_rule_recurrent` is the token-by-token form it must equal (tools/train/test_model.py checks both).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_embd: int = 256
    n_layer: int = 4  # trunk layers; the MTP block is layer n_layer
    full_attention_interval: int = 4  # 1 = full attention only
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_rot: int = 16  # NeoX RoPE over the first n_rot dims of each head (Qwen3.5 rotates 64 of 256)
    n_ff: int = 768
    d_conv: int = 4
    head_k_dim: int = 64  # = head_v_dim (make-tiny's ssm.inner_size = state_size * time_step_rank)
    n_k_heads: int = 2
    n_v_heads: int = 4
    rope_base: float = 10000.0
    eps: float = 1e-6
    n_ctx: int = 256

    def recurrent(self, il: int) -> bool:
        return il < self.n_layer and (il + 1) % self.full_attention_interval != 0

    @property
    def v_dim(self) -> int:
        return self.n_v_heads * self.head_k_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.n_k_heads * self.head_k_dim + self.v_dim

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_shapes(s: Shape, mtp: bool = True) -> dict[str, tuple]:
    """Every tensor (numpy shape) of the model, named as llama.cpp's converter names them."""
    e = s.n_embd
    out = {"token_embd.weight": (s.n_vocab, e), "output_norm.weight": (e,), "output.weight": (s.n_vocab, e)}

    def full(b):
        out.update({
            b + "attn_q.weight": (2 * s.n_head * s.head_dim, e),
            b + "attn_k.weight": (s.n_head_kv * s.head_dim, e),
            b + "attn_v.weight": (s.n_head_kv * s.head_dim, e),
            b + "attn_output.weight": (e, s.n_head * s.head_dim),
            b + "attn_q_norm.weight": (s.head_dim,),
            b + "attn_k_norm.weight": (s.head_dim,),
        })

    for il in range(s.n_layer + (1 if mtp else 0)):
        b = f"blk.{il}."
        out[b + "attn_norm.weight"] = (e,)
        if s.recurrent(il):
            hv = s.n_v_heads
            out.update({
                b + "attn_qkv.weight": (s.conv_dim, e),
                b + "attn_gate.weight": (s.v_dim, e),
                b + "ssm_conv1d.weight": (s.conv_dim, s.d_conv),
                b + "ssm_dt.bias": (hv,),
                b + "ssm_a": (hv,),
                b + "ssm_beta.weight": (hv, e),
                b + "ssm_alpha.weight": (hv, e),
                b + "ssm_norm.weight": (s.head_k_dim,),
                b + "ssm_out.weight": (e, s.v_dim),
            })
        else:
            full(b)
        out[b + "post_attention_norm.weight"] = (e,)
        out[b + "ffn_gate.weight"] = (s.n_ff, e)
        out[b + "ffn_up.weight"] = (s.n_ff, e)
        out[b + "ffn_down.weight"] = (e, s.n_ff)
        if il == s.n_layer:
            out[b + "nextn.eh_proj.weight"] = (e, 2 * e)
            out[b + "nextn.enorm.weight"] = (e,)
            out[b + "nextn.hnorm.weight"] = (e,)
            out[b + "nextn.shared_head_norm.weight"] = (e,)
    return out


def _key(name: str) -> str:
    return name.replace(".", "|")  # ParameterDict keys may not hold dots


# ------------------------------------------------------------------------------------------ building blocks


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def l2_norm(x, eps):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rope_neox(x, pos, n_rot, base):
    """x [B, T, H, D] turned at positions pos [T]: pairs (i, i + n_rot/2), i < n_rot/2, by
    pos * base^(-2i/n_rot); dims >= n_rot pass (M-RoPE at text positions [p, p, p, 0], sections with no pair
    on the fourth channel)."""
    half = n_rot // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / n_rot)
    theta = pos.to(torch.float64)[:, None] * inv[None, :]  # [T, half]
    cos = torch.cos(theta).to(x.dtype)[None, :, None, :]
    sin = torch.sin(theta).to(x.dtype)[None, :, None, :]
    a, b, rest = x[..., :half], x[..., half:n_rot], x[..., n_rot:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)


def delta_rule_recurrent(q, k, v, g, beta, state=None):
    """Token by token. q, k [B, H, T, dk] (q already scaled), v [B, H, T, dv], g, beta [B, H, T].
    Returns o [B, H, T, dv] and the final state [B, H, dk, dv]."""
    B, H, T, dk = k.shape
    S = k.new_zeros(B, H, dk, v.shape[-1]) if state is None else state
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, :, t])[..., None, None]
        d = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, t]))
        S = S + k[:, :, t, :, None] * d[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    return torch.stack(outs, dim=2), S


def delta_rule_chunked(q, k, v, g, beta, chunk: int = 64):
    """The same recurrence from a zero state, chunk by chunk (WY form). Within a chunk with cumulative
    log-decay G: the corrections u = (I + A)^-1 (beta v - beta exp(G) k S0), A[i, j] = beta_i k_i.k_j
    exp(G_i - G_j) for j < i; o = exp(G) q S0 + (q k^T * exp(G_i - G_j), j <= i) u; the state moves to
    exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, n, chunk, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    G = g.cumsum(-1)  # [B, H, n, C]
    diff = G[..., :, None] - G[..., None, :]  # [.., i, j] = G_i - G_j
    lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool), 0)
    strict = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool), -1)
    decay = torch.where(lower, diff, torch.full_like(diff, -math.inf)).exp()  # [.., C, C]
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * decay * strict
    eye = torch.eye(chunk, dtype=k.dtype)
    Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    w = Tinv @ (kb * G.exp()[..., None])  # [.., C, dk]: what S0 takes away from each u
    u0 = Tinv @ (v * beta[..., None])  # [.., C, dv]
    qk = (q @ k.transpose(-1, -2)) * decay  # [.., C, C], j <= i
    S = q.new_zeros(B, H, dk, dv)
    outs = []
    for c in range(n):
        u = u0[:, :, c] - w[:, :, c] @ S
        o = (q[:, :, c] * G[:, :, c, :, None].exp()) @ S + qk[:, :, c] @ u
        outs.append(o)
        gl = G[:, :, c, -1]
        S = S * gl.exp()[..., None, None] + (k[:, :, c] * (gl[..., None] - G[:, :, c]).exp()[..., None]).transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2).reshape(B, H, n * chunk, dv)
    return o[:, :, :T]


# ------------------------------------------------------------------------------------------------ model


class Qwen35(torch.nn.Module):
    def __init__(self, shape: Shape, mtp: bool = True, seed: int = 0):
        super().__init__()
        self.s = shape
        self.mtp = mtp
        gen = torch.Generator().manual_seed(seed)
        params = {}
        for name, shp in tensor_shapes(shape, mtp).items():
            params[_key(name)] = torch.nn.Parameter(self._init(name, shp, gen))
        self.p = torch.nn.ParameterDict(params)
        self.chunked = True

    def _init(self, name, shp, gen):
        s = self.s
        if name.endswith("ssm_a"):
            return -torch.exp(torch.log(torch.linspace(1.0, 16.0, shp[0])))  # A_log = log(1..16), as HF inits
        if name.endswith("ssm_dt.bias"):
            dt = torch.exp(torch.rand(shp, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        if len(shp) == 1:
            return torch.ones(shp)
        if name.endswith("ssm_conv1d.weight"):
            return torch.randn(shp, generator=gen) / math.sqrt(s.d_conv)
        std = 0.02
        if name.endswith(("attn_output.weight", "ssm_out.weight", "ffn_down.weight")):
            std = 0.02 / math.sqrt(2 * (s.n_layer + 1))
        return torch.randn(shp, generator=gen) * std

    def w(self, name: str):
        return self.p[_key(name)]

    def named_gguf(self) -> dict:
        return {k.replace("|", "."): v for k, v in self.p.items()}

    # ------------------------------------------------------------------------------------------- layers

    def gated_attention(self, il, cur, pos, kv_prev=None, keep=None):
        """kv_prev: (k, v) [B, T, n_head_kv, d] of an earlier pass over the same positions; row i then
        attends to their positions < i and to its own key only (an MTP draft step after the catch-up).
        keep: a list the (k, v) of this pass are appended to."""
        s, b = self.s, f"blk.{il}."
        B, T, _ = cur.shape
        d = s.head_dim
        qf = (cur @ self.w(b + "attn_q.weight").T).view(B, T, s.n_head, 2 * d)
        q, gate = qf[..., :d], qf[..., d:].reshape(B, T, s.n_head * d)
        k = (cur @ self.w(b + "attn_k.weight").T).view(B, T, s.n_head_kv, d)
        v = (cur @ self.w(b + "attn_v.weight").T).view(B, T, s.n_head_kv, d)
        q = rms_norm(q, self.w(b + "attn_q_norm.weight"), s.eps)
        k = rms_norm(k, self.w(b + "attn_k_norm.weight"), s.eps)
        q = rope_neox(q, pos, s.n_rot, s.rope_base)
        k = rope_neox(k, pos, s.n_rot, s.rope_base)
        if keep is not None:
            keep.append((k, v))
        mask = None
        if kv_prev is not None:
            k, v = torch.cat([kv_prev[0], k], dim=1), torch.cat([kv_prev[1], v], dim=1)  # [B, 2T, n_head_kv, d]
            i = torch.arange(T)
            mask = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], dim=1)  # [T, 2T]
        group = s.n_head // s.n_head_kv  # query head h reads kv head h // group
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None,
                                             scale=1.0 / math.sqrt(d))  # [B, H, T, d]
        att = att.transpose(1, 2).reshape(B, T, s.n_head * d)
        return (att * torch.sigmoid(gate)) @ self.w(b + "attn_output.weight").T

    def linear_attention(self, il, cur):
        s, b = self.s, f"blk.{il}."
        B, T, _ = cur.shape
        hk, hv, dk = s.n_k_heads, s.n_v_heads, s.head_k_dim
        qkv = cur @ self.w(b + "attn_qkv.weight").T  # [B, T, conv_dim]
        z = cur @ self.w(b + "attn_gate.weight").T  # [B, T, hv * dv]
        g = self.w(b + "ssm_a") * F.softplus(cur @ self.w(b + "ssm_alpha.weight").T + self.w(b + "ssm_dt.bias"))
        beta = torch.sigmoid(cur @ self.w(b + "ssm_beta.weight").T)  # [B, T, hv]
        conv_w = self.w(b + "ssm_conv1d.weight")  # [conv_dim, d_conv]
        x = F.pad(qkv.transpose(1, 2), (s.d_conv - 1, 0))
        x = F.silu(F.conv1d(x, conv_w[:, None, :], groups=s.conv_dim)).transpose(1, 2)  # [B, T, conv_dim]
        q = l2_norm(x[..., : hk * dk].reshape(B, T, hk, dk), s.eps) / math.sqrt(dk)
        k = l2_norm(x[..., hk * dk : 2 * hk * dk].reshape(B, T, hk, dk), s.eps)
        v = x[..., 2 * hk * dk :].reshape(B, T, hv, dk)
        rep = hv // hk  # value head h reads key head h % hk (tiled)
        q, k = q.repeat(1, 1, rep, 1), k.repeat(1, 1, rep, 1)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2), beta.transpose(1, 2))
        o = delta_rule_chunked(*args) if self.chunked else delta_rule_recurrent(*args)[0]
        o = o.transpose(1, 2)  # [B, T, hv, dv]
        o = rms_norm(o, self.w(b + "ssm_norm.weight"), s.eps) * F.silu(z.view(B, T, hv, dk))
        return o.reshape(B, T, hv * dk) @ self.w(b + "ssm_out.weight").T

    def layer(self, il, x, pos, kv_prev=None, keep=None):
        s, b = self.s, f"blk.{il}."
        cur = rms_norm(x, self.w(b + "attn_norm.weight"), s.eps)
        if s.recurrent(il):
            cur = self.linear_attention(il, cur)
        else:
            cur = self.gated_attention(il, cur, pos, kv_prev, keep)
        x = x + cur
        cur = rms_norm(x, self.w(b + "post_attention_norm.weight"), s.eps)
        gate = cur @ self.w(b + "ffn_gate.weight").T
        up = cur @ self.w(b + "ffn_up.weight").T
        return x + (F.silu(gate) * up) @ self.w(b + "ffn_down.weight").T

    # ------------------------------------------------------------------------------------------ forward

    def trunk(self, tokens):
        """tokens [B, T] -> (h_nextn [B, T, n_embd], logits [B, T, n_vocab]), positions 0..T-1."""
        pos = torch.arange(tokens.shape[1])
        x = F.embedding(tokens, self.w("token_embd.weight"))
        for il in range(self.s.n_layer):
            x = self.layer(il, x, pos)
        h = rms_norm(x, self.w("output_norm.weight"), self.s.eps)
        return h, h @ self.w("output.weight").T

    def mtp_hidden(self, tokens, h, kv_prev=None, keep=None):
        """The MTP block's normed output [B, T, n_embd]: row p from token p and h of p - 1 (the trunk's, or
        for a second draft step the block's own output with kv_prev the first pass's keys and values)."""
        s, b = self.s, f"blk.{self.s.n_layer}."
        pos = torch.arange(tokens.shape[1])
        hprev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        e = rms_norm(F.embedding(tokens, self.w("token_embd.weight")), self.w(b + "nextn.enorm.weight"), s.eps)
        hn = rms_norm(hprev, self.w(b + "nextn.hnorm.weight"), s.eps)
        x = torch.cat([e, hn], dim=-1) @ self.w(b + "nextn.eh_proj.weight").T
        x = self.layer(s.n_layer, x, pos, kv_prev, keep)
        return rms_norm(x, self.w(b + "nextn.shared_head_norm.weight"), s.eps)

    def mtp_logits(self, tokens, h):
        return self.mtp_hidden(tokens, h) @ self.w("output.weight").T


def from_gguf(path) -> Qwen35:
    """The model of a qwen35 GGUF file written by export.py, its weights dequantized to float32."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path), "r")

    def key(name):
        f = reader.fields[name]
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v.item()

    a = key("general.architecture")
    n_nextn = key(f"{a}.nextn_predict_layers") if f"{a}.nextn_predict_layers" in reader.fields else 0
    n_layer = key(f"{a}.block_count") - n_nextn
    weights = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        data = gguf.quants.dequantize(np.array(t.data), qtype)
        weights[t.name] = torch.from_numpy(np.asarray(data, np.float32).reshape([int(n) for n in reversed(t.shape)]))
    shape = Shape(
        n_vocab=weights["token_embd.weight"].shape[0], n_embd=key(f"{a}.embedding_length"), n_layer=n_layer,
        full_attention_interval=key(f"{a}.full_attention_interval"), n_head=key(f"{a}.attention.head_count"),
        n_head_kv=key(f"{a}.attention.head_count_kv"), head_dim=key(f"{a}.attention.key_length"),
        n_rot=key(f"{a}.rope.dimension_count"), n_ff=key(f"{a}.feed_forward_length"),
        d_conv=key(f"{a}.ssm.conv_kernel"), head_k_dim=key(f"{a}.ssm.state_size"),
        n_k_heads=key(f"{a}.ssm.group_count"), n_v_heads=key(f"{a}.ssm.time_step_rank"),
        rope_base=key(f"{a}.rope.freq_base"), eps=key(f"{a}.attention.layer_norm_rms_epsilon"),
        n_ctx=key(f"{a}.context_length"),
    )
    model = Qwen35(shape, mtp=n_nextn == 1)
    with torch.no_grad():
        for name, t in model.named_gguf().items():
            t.copy_(weights[name])
    return model.eval()
