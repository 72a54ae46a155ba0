"""Float64 numpy reference of the Gated DeltaNet blocks (kernels/ssm_conv.cl, kernels/delta_net.cl).

Written to be obviously right, token by token, after llama.cpp's src/models/qwen35.cpp,
delta-net-base.cpp (build_delta_net_autoregressive) and ggml-cpu's ssm_conv / gated_delta_net.

Layouts (row-major, as the kernels use them):
    conv input x [n_tokens, channels], weight [channels, kernel_size] (GGUF ssm_conv1d, ne = {K, C}),
    conv state [kernel_size - 1, channels] per sequence (oldest input first);
    qkv [n_tokens, 2 * n_k_heads * dk + n_v_heads * dv] (q heads, then k heads, then v heads);
    delta state S [n_v_heads, dk, dv] per sequence; v head h reads k/q head h % n_k_heads
    (ggml_repeat_4d tiles the k heads, it does not interleave them).
"""

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ssm_conv(x, weight, state):
    """y = silu(causal depthwise conv of (state ++ x)); returns (y, new_state), both float64."""
    x, weight, state = (np.asarray(a, np.float64) for a in (x, weight, state))
    km1 = weight.shape[1] - 1
    full = np.concatenate([state, x], axis=0)  # [km1 + n_tokens, channels]
    y = np.empty_like(x)
    for t in range(x.shape[0]):
        y[t] = np.sum(full[t:t + km1 + 1].T * weight, axis=1)
    return silu(y), full[full.shape[0] - km1:].copy()


def gates(alpha, b, dt_bias, ssm_a):
    """g = ssm_a * softplus(alpha + dt_bias) (log decay, ssm_a = -exp(A_log)), beta = sigmoid(b)."""
    alpha, b = np.asarray(alpha, np.float64), np.asarray(b, np.float64)
    return np.asarray(ssm_a, np.float64) * softplus(alpha + np.asarray(dt_bias, np.float64)), sigmoid(b)


def l2_norm(x, eps):
    """ggml's build_gdn_l2_norm: x / sqrt(sum(x^2) + eps) over the last axis."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def delta_net(qkv, g, beta, state, n_k_heads, n_v_heads, dk, dv, eps):
    """Gated delta rule over the tokens of one sequence; returns (o [n_tokens, n_v_heads*dv], new state).

    qkv: the conv output (before l2 norm); g, beta: [n_tokens, n_v_heads]; state: [n_v_heads, dk, dv].
    """
    qkv = np.asarray(qkv, np.float64)
    n = qkv.shape[0]
    q = l2_norm(qkv[:, :n_k_heads * dk].reshape(n, n_k_heads, dk), eps) / np.sqrt(dk)
    k = l2_norm(qkv[:, n_k_heads * dk:2 * n_k_heads * dk].reshape(n, n_k_heads, dk), eps)
    v = qkv[:, 2 * n_k_heads * dk:].reshape(n, n_v_heads, dv)
    S = np.array(state, np.float64)
    o = np.empty((n, n_v_heads, dv))
    for t in range(n):
        for h in range(n_v_heads):
            hk = h % n_k_heads
            S[h] *= np.exp(g[t, h])
            d = beta[t, h] * (v[t, h] - S[h].T @ k[t, hk])
            S[h] += np.outer(k[t, hk], d)
            o[t, h] = S[h].T @ q[t, hk]
    return o.reshape(n, n_v_heads * dv), S


def gated_rms_norm(x, z, weight, eps):
    """rmsnorm(x) * weight * silu(z) per head row: x, z [rows, head_dim], weight [head_dim]."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight * silu(z)
