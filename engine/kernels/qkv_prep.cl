// qkv_prep.cl - after the fused Q|K|V projection: per-head q/k RMSNorm, RoPE, and the KV-cache store.
//
// Input qkv float32 [n_tokens, ROW_LEN]: each row is Q heads, then K heads, then V heads (the output of one
// mat-vec over the row-concatenated attn_q | attn_k | attn_v weights). With Q_GATE (qwen35's gated
// attention) each Q head is followed by its HD output-gate values (attn_q projects both, head by head), so a
// row is N_HEAD * 2 * HD + 2 * N_HEAD_KV * HD; the gates stay in qkv for kernel_attention (its GATE_ROW).
// Q heads: optional RMSNorm with q_norm (QK_NORM), RoPE on the first N_ROT dims, written to
//   q_out float32 [n_tokens, N_HEAD * HD] (the layout kernel_attention reads).
// K heads: optional RMSNorm with k_norm, RoPE, stored as half at k_cache[(seq[t], pos[t])].
// V heads: stored as half at v_cache[(seq[t], pos[t])].
// Cache layout: [n_seq, N_HEAD_KV, n_ctx] rows of HD values of type K_TYPE / V_TYPE (kv_types.h: head-major,
// KV_ROW; f16 by default, as kernel_kv_store writes it; q8_0, q4_0); with KV_RING (a sliding-window layer)
// [n_seq, N_HEAD_KV, KV_RING], position p at row p % KV_RING. Tokens with a position or sequence outside the cache store
// nothing (as kernel_kv_store).
// RoPE: theta_i = pos * freq_scale * 2^(i * log2_theta_scale), log2_theta_scale = -2 log2(base) / N_ROT;
//   NEOX rotates (i, i + N_ROT/2), otherwise adjacent pairs (2i, 2i+1) - as tests/kernels/rope.cl. With
//   FREQ_FACTORS (Llama 3.1's rope_freqs.weight, ggml_rope_ext's freq_factors) theta_i is divided by
//   freq_factors[i]. With MROPE_T/_H/_W/_E (qwen35's interleaved M-RoPE sections, defined only when some
//   pair falls on the fourth, e, section): pair i belongs to sector s = i % (sum of sections), which is t,
//   h or w when s % 3 picks that section and s < 3 * its count, else e; text tokens have position 0 on e
//   (llama.cpp's text positions [p, p, p, 0]), so those pairs do not turn.
//
// NDRange: 2-D (N_HEAD + 2 * N_HEAD_KV rounded up to the local size, n_tokens rows, at least 1), local
// (QKV_WG, 1): one work-item per (head, token), a head of HD floats in private memory. The group's work-items
// first share out the sincos of the token's N_ROT / 2 angles (local memory): per head, as before, the trig
// cost more than the rest (qwen3 ~300M, 512-token prompt: 157 -> 36 ms over 9 layers at QKV_WG 8). Groups of
// a few heads still let PoCL spread one token's heads over the cores (one group of 32 heads ran on one core).
// Replaces five launches per layer (q norm, k norm, rope q, rope k, kv_store): on PoCL each launch costs
// ~20 us of dispatch, more than this kernel's work.
// Reference: tests/test_ops_qkv.py (the composition of norm.cl, tests/kernels/rope.cl and kv_store, and numpy).

#include "kv_types.h"

#ifndef Q_GATE
#define Q_GATE 0
#endif
#ifndef FREQ_FACTORS
#define FREQ_FACTORS 0
#endif
#define Q_STRIDE ((1 + Q_GATE) * HD)  // floats from one Q head to the next in a qkv row
#define ROW_LEN (N_HEAD * Q_STRIDE + 2 * N_HEAD_KV * HD)

// Offset of head h (Q heads, then K, then V) in a qkv row.
inline int head_offset(const int h) {
    return h < N_HEAD ? h * Q_STRIDE : N_HEAD * Q_STRIDE + (h - N_HEAD) * HD;
}

__kernel void kernel_qkv_prep(__global const float *qkv, __global float *q_out, __global uchar *k_cache,
                              __global uchar *v_cache, __global const int *pos, __global const int *seq,
                              __global const float *q_norm, __global const float *k_norm,
                              __global const float *freq_factors, const float eps,
                              const float freq_scale, const float log2_theta_scale, const int n_ctx,
                              const int n_seq, const int n_tokens) {
    __local float rope_cos[N_ROT / 2], rope_sin[N_ROT / 2];
    const int h = get_global_id(0);
    const int t = get_global_id(1);
    // the rotation of each pair at this token's position, once per work-group (all its heads share the token):
    // sincos of a large angle costs more than the rest of a head's work
    const int p = t < n_tokens ? pos[t] : 0;
    for (int i = get_local_id(0); i < N_ROT / 2; i += get_local_size(0)) {
#if FREQ_FACTORS
        const float theta = (float)p * freq_scale * exp2((float)i * log2_theta_scale) / freq_factors[i];
#else
        const float theta = (float)p * freq_scale * exp2((float)i * log2_theta_scale);
#endif
        float c;
        rope_sin[i] = sincos(theta, &c);
        rope_cos[i] = c;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (t >= n_tokens || h >= N_HEAD + 2 * N_HEAD_KV) {  // the grid is rounded up to the local size
        return;
    }
    __global const float *src = qkv + (size_t)t * ROW_LEN + head_offset(h);
    const int s = seq[t];
    const int in_cache = (uint)p < (uint)n_ctx && (uint)s < (uint)n_seq;
    float x[HD];
    for (int d = 0; d < HD; d++) {
        x[d] = src[d];
    }
    if (h >= N_HEAD + N_HEAD_KV) {  // a V head: store it
        if (in_cache) {
            const size_t r = KV_ROW(s, h - N_HEAD - N_HEAD_KV, KV_SLOT(p), N_HEAD_KV, n_ctx);
            kv_store_row(v_cache + r * KV_ROW_BYTES(V_TYPE, HD), x, HD, V_TYPE);
        }
        return;
    }
#if QK_NORM
    __global const float *w = h < N_HEAD ? q_norm : k_norm;
    float ss = 0.0f;
    for (int d = 0; d < HD; d++) {
        ss += x[d] * x[d];
    }
    const float scale = rsqrt(ss / (float)HD + eps);
    for (int d = 0; d < HD; d++) {
        x[d] = x[d] * scale * w[d];
    }
#endif
    for (int i = 0; i < N_ROT / 2; i++) {
#ifdef MROPE_T
        const int sec = i % (MROPE_T + MROPE_H + MROPE_W + MROPE_E);
        if (!((sec % 3 == 0 && sec < 3 * MROPE_T) || (sec % 3 == 1 && sec < 3 * MROPE_H) ||
              (sec % 3 == 2 && sec < 3 * MROPE_W))) {
            continue;  // the e section: angle 0 at text positions
        }
#endif
        const float c = rope_cos[i], sn = rope_sin[i];
#if NEOX
        const int i0 = i, i1 = i + N_ROT / 2;
#else
        const int i0 = 2 * i, i1 = 2 * i + 1;
#endif
        const float a = x[i0], b = x[i1];
        x[i0] = a * c - b * sn;
        x[i1] = a * sn + b * c;
    }
    if (h < N_HEAD) {
        __global float *dst = q_out + (size_t)t * N_HEAD * HD + (size_t)h * HD;
        for (int d = 0; d < HD; d++) {
            dst[d] = x[d];
        }
    } else if (in_cache) {
        const size_t r = KV_ROW(s, h - N_HEAD, KV_SLOT(p), N_HEAD_KV, n_ctx);
        kv_store_row(k_cache + r * KV_ROW_BYTES(K_TYPE, HD), x, HD, K_TYPE);
    }
}
