// delta_net.cl - the gated delta rule of Gated DeltaNet layers (qwen35, qwen35moe, qwen3next).
//
// For each token t of a batch that may mix sequences (s = seqs[t], the slot of token t; a sequence's tokens
// come in order of position) and each value head h (k/q head hk = h % H_K: ggml's repeat tiles the k heads
// over the v heads, it does not interleave them), with state S = state[s, h] float32 [DK, DV] (S[i][j] at
// i * DV + j), in batch order:
//     S = exp(g[t, h]) * S
//     S += k_t (beta[t, h] * (v_t - S^T k_t))^T
//     o[t, h] = S^T q_t
// where q_t, k_t are the l2-normalised q / k rows of head hk (q also scaled by 1 / sqrt(DK)), as
// kernel_gdn_prep leaves them. The states are read and written in place; sequences with no token in the
// batch are not touched. A token whose seqs[t] is outside [0, n_seq) is skipped (out[t] not written).
// Layouts: qkv float32 [n_tokens, QKV_DIM] with QKV_DIM = 2 * H_K * DK + H_V * DV (q heads, k heads,
// v heads: the ssm_conv output); g, beta float32 [n_tokens, H_V]; out float32 [n_tokens, H_V * DV];
// state float32 [n_seq, H_V, DK, DV]; seqs int32 [n_tokens].
// Sequences: a work-item holds its column of the state of one sequence at a time. Where the sequence
//     changes from one token (recurrent) or chunk (chunked: a chunk ends after CH tokens or where the
//     sequence changes, found by run_end) to the next, it stores its column to the previous sequence's
//     slot and loads the new one's, so a batch of runs [s2 s2 s2 s0 s5 s5] costs one load and one store
//     per run, and a sequence that comes back in a later run resumes from what its earlier run stored
//     (each work-item reads back only the state column it wrote, so no fence is needed). The recurrent
//     form checks seqs[t] at every token rather than scanning for runs first: on an H100 at 512 tokens
//     the check cost nothing measurable, a scan up front (then a loop over the run) 19%; on PoCL both
//     are within noise of the single-sequence kernel.
//
// Kernels:
// kernel_gdn_prep: in place on qkv, q and k rows: x / sqrt(sum(x^2) + eps) (ggml's build_gdn_l2_norm),
//     q rows also times 1 / sqrt(DK); and the gates: g = ssm_a * softplus(alpha + dt_bias) written over
//     alpha, beta = sigmoid(b) written over b (alpha, b: float32 [n_tokens, H_V], the ssm_alpha /
//     ssm_beta projections). NDRange 1-D: one group of WG work-items per (token, q/k row):
//     global = n_tokens * 2 * H_K * WG, local = WG; group 0 of each token also writes its gates.
// kernel_gdn_recurrent_v16: the same with 16 columns per work-item as float16 vectors (CPUs; see below).
// kernel_gdn_recurrent: one work-item per value column j of one head: global = (DV, H_V),
//     local = (LR, 1). The work-item keeps its state column S[:, j] in registers and loops over the
//     tokens of the batch; there is no cross-work-item traffic, so no barrier. Used for decode (1 token
//     per sequence) and drafts.
// kernel_gdn_chunked: the chunked (WY-style) form over chunks of up to CH consecutive tokens of one
//     sequence, for prompts: a chunk ends after CH tokens or where the sequence changes (the Gram
//     matrices below only relate tokens of one sequence). Same grid with
//     local = (DV, 1): the group stages a chunk's k and q in local memory, builds the two CH x CH
//     decayed Gram matrices A_kk[t][s] = beta_t e^(G_t - G_s) k_t.k_s (s < t) and
//     A_qk[t][s] = e^(G_t - G_s) q_t.k_s (s <= t) (G = cumulative g in the chunk) cooperatively, then
//     each work-item solves (I + A_kk) u = beta (v - e^G K S0) for its column by forward substitution,
//     writes o = e^G Q S0 + A_qk u and moves its column on: S = e^(G_last) S0 + sum_s e^(G_last - G_s) k_s u_s.
//     The k.S and q.S products of the CH tokens are independent of each other (the recurrent form has a
//     dependency through S after every token), and k / q are read from local memory once per chunk.
// Defines: H_K, H_V, DK, DV, WG (prep: 16 on CPUs, 64 on GPUs), LR (recurrent local size), CH (chunk),
//     EPS_L2 is an argument, not a define.
// Reference: tests/delta_net_reference.py::delta_net, ::gates, ::gated_rms_norm.

#define QKV_DIM (2 * H_K * DK + H_V * DV)

#ifndef WG
#define WG 16
#endif
#ifndef CH
#define CH 64
#endif

#include "seq_runs.h"

// At a change of sequence: store the work-item's state column sc to the sequence it belongs to, and load
// sequence s's (a slot outside [0, n_seq) must not touch memory outside the state buffer: cur = -1 then,
// and its tokens are skipped). Shared by the recurrent and the chunked form.
#define SWITCH_SEQUENCE(s)                                                                                  \
    if ((s) != cur) {                                                                                      \
        if (cur >= 0) {                                                                                    \
            for (int i = 0; i < DK; i++) {                                                                 \
                st[(size_t)i * DV] = sc[i];                                                                \
            }                                                                                              \
        }                                                                                                  \
        cur = ((s) >= 0 && (s) < n_seq) ? (s) : -1;                                                        \
        if (cur >= 0) {                                                                                    \
            st = state + ((size_t)cur * H_V + h) * DK * DV + j;                                            \
            for (int i = 0; i < DK; i++) {                                                                 \
                sc[i] = st[(size_t)i * DV];                                                                \
            }                                                                                              \
        }                                                                                                  \
    }


#include "group_sum.h"

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_gdn_prep(__global float *qkv, __global float *alpha, __global float *b,
                     __global const float *dt_bias, __global const float *ssm_a, const float eps) {
    __local float part[WG];
    const int grp = get_group_id(0);
    const int t = grp / (2 * H_K);
    const int r = grp % (2 * H_K);  // rows 0..H_K-1 are q heads, H_K..2H_K-1 are k heads
    const int lid = get_local_id(0);
    __global float *row = qkv + (size_t)t * QKV_DIM + (size_t)r * DK;
    float s = 0.0f;
    for (int i = lid; i < DK; i += WG) {
        s = mad(row[i], row[i], s);
    }
    float scale = rsqrt(group_sum(s, part) + eps);
    if (r < H_K) {
        scale *= rsqrt((float)DK);
    }
    for (int i = lid; i < DK; i += WG) {
        row[i] *= scale;
    }
    if (r == 0) {
        for (int h = lid; h < H_V; h += WG) {
            const size_t o = (size_t)t * H_V + h;
            const float a = alpha[o] + dt_bias[h];
            // softplus without overflow: log1p(exp(-|a|)) + max(a, 0)
            alpha[o] = ssm_a[h] * (fmax(a, 0.0f) + log1p(exp(-fabs(a))));
            b[o] = 1.0f / (1.0f + exp(-b[o]));
        }
    }
}

__kernel void kernel_gdn_recurrent(__global const float *qkv, __global const float *g,
                                   __global const float *beta, __global float *state, __global float *out,
                                   __global const int *seqs, const int n_seq, const int n_tokens) {
    const int j = get_global_id(0);
    const int h = get_global_id(1);
    const int hk = h % H_K;
    if (j >= DV) {
        return;
    }
    float sc[DK];  // column j of the state of sequence `cur`
    int cur = -1;  // -1: none (before the first token, or a bad slot)
    __global float *st = state + j;
    for (int t = 0; t < n_tokens; t++) {
        const int s = seqs[t];
        SWITCH_SEQUENCE(s)
        if (cur < 0) {
            continue;
        }
        __global const float *row = qkv + (size_t)t * QKV_DIM;
        __global const float *q = row + hk * DK;
        __global const float *k = row + (H_K + hk) * DK;
        const float v = row[2 * H_K * DK + h * DV + j];
        const float decay = exp(g[(size_t)t * H_V + h]);
        const float bt = beta[(size_t)t * H_V + h];
        float kv = 0.0f;
        for (int i = 0; i < DK; i++) {
            sc[i] *= decay;
            kv = mad(sc[i], k[i], kv);
        }
        const float d = bt * (v - kv);
        float o = 0.0f;
        for (int i = 0; i < DK; i++) {
            sc[i] = mad(k[i], d, sc[i]);
            o = mad(sc[i], q[i], o);
        }
        out[(size_t)t * H_V * DV + h * DV + j] = o;
    }
    if (cur >= 0) {
        for (int i = 0; i < DK; i++) {
            st[(size_t)i * DV] = sc[i];
        }
    }
}

// kernel_gdn_recurrent_v16: the recurrent form with 16 value columns per work-item, as float16 vectors
// (global = (DV / 16, H_V), any local size dividing it). For CPUs: PoCL does not vectorise the one-column
// kernel across work-items (its private column array defeats it), so a 1-token step took ~200 us per
// layer at 8 heads of 128 x 128; here the 16 columns are the SIMD lanes. Same arithmetic per column.
__kernel void kernel_gdn_recurrent_v16(__global const float *qkv, __global const float *g,
                                       __global const float *beta, __global float *state, __global float *out,
                                       __global const int *seqs, const int n_seq, const int n_tokens) {
    const int j = get_global_id(0) * 16;
    const int h = get_global_id(1);
    const int hk = h % H_K;
    if (j >= DV) {
        return;
    }
    float16 sv[DK];  // columns j .. j + 15 of the state of sequence `cur`
    int cur = -1;
    __global float *st = state + j;
    for (int t = 0; t < n_tokens; t++) {
        const int s = seqs[t];
        if (s != cur) {
            if (cur >= 0) {
                for (int i = 0; i < DK; i++) {
                    vstore16(sv[i], 0, st + (size_t)i * DV);
                }
            }
            cur = (s >= 0 && s < n_seq) ? s : -1;  // a bad slot's tokens are skipped
            if (cur >= 0) {
                st = state + ((size_t)cur * H_V + h) * DK * DV + j;
                for (int i = 0; i < DK; i++) {
                    sv[i] = vload16(0, st + (size_t)i * DV);
                }
            }
        }
        if (cur < 0) {
            continue;
        }
        __global const float *row = qkv + (size_t)t * QKV_DIM;
        __global const float *q = row + hk * DK;
        __global const float *k = row + (H_K + hk) * DK;
        const float16 v = vload16(0, row + 2 * H_K * DK + h * DV + j);
        const float decay = exp(g[(size_t)t * H_V + h]);
        const float bt = beta[(size_t)t * H_V + h];
        float16 kv = (float16)(0.0f);
        for (int i = 0; i < DK; i++) {
            sv[i] *= decay;
            kv = mad(sv[i], (float16)(k[i]), kv);
        }
        const float16 d = bt * (v - kv);
        float16 o = (float16)(0.0f);
        for (int i = 0; i < DK; i++) {
            sv[i] = mad((float16)(k[i]), d, sv[i]);
            o = mad(sv[i], (float16)(q[i]), o);
        }
        vstore16(o, 0, out + (size_t)t * H_V * DV + h * DV + j);
    }
    if (cur >= 0) {
        for (int i = 0; i < DK; i++) {
            vstore16(sv[i], 0, st + (size_t)i * DV);
        }
    }
}

__kernel __attribute__((reqd_work_group_size(DV, 1, 1)))
void kernel_gdn_chunked(__global const float *qkv, __global const float *g, __global const float *beta,
                        __global float *state, __global float *out, __global const int *seqs,
                        const int n_seq, const int n_tokens) {
    __local float Kc[CH * DK];
    __local float Qc[CH * DK];
    __local float Akk[CH * CH];
    __local float Aqk[CH * CH];
    __local float gam[CH];
    __local float bet[CH];
    const int j = get_local_id(0);
    const int h = get_group_id(1);
    const int hk = h % H_K;
    float sc[DK];  // column j of the state of sequence `cur`
    float u[CH];
    int cur = -1;  // -1: none (before the first chunk, or a bad slot)
    __global float *st = state + j;
    // Every branch below depends only on seqs and n_tokens, the same for the whole group, so no barrier
    // is skipped by only part of it.
    for (int c0 = 0, L = 0; c0 < n_tokens; c0 += L) {
        const int s = seqs[c0];
        L = run_end(seqs, c0, min(c0 + CH, n_tokens)) - c0;  // the chunk: up to CH tokens of sequence s
        SWITCH_SEQUENCE(s)
        if (cur < 0) {
            continue;
        }
        for (int idx = j; idx < L * DK; idx += DV) {
            const int t = idx / DK;
            const int i = idx - t * DK;
            __global const float *row = qkv + (size_t)(c0 + t) * QKV_DIM;
            Qc[idx] = row[hk * DK + i];
            Kc[idx] = row[(H_K + hk) * DK + i];
        }
        if (j == 0) {
            float acc = 0.0f;
            for (int t = 0; t < L; t++) {
                acc += g[(size_t)(c0 + t) * H_V + h];
                gam[t] = acc;
                bet[t] = beta[(size_t)(c0 + t) * H_V + h];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int idx = j; idx < L * L; idx += DV) {
            const int t = idx / L;
            const int r = idx - t * L;
            if (r <= t) {
                float dkk = 0.0f, dqk = 0.0f;
                for (int i = 0; i < DK; i++) {
                    dkk = mad(Kc[t * DK + i], Kc[r * DK + i], dkk);
                    dqk = mad(Qc[t * DK + i], Kc[r * DK + i], dqk);
                }
                const float e = exp(gam[t] - gam[r]);
                Akk[t * CH + r] = r < t ? bet[t] * e * dkk : 0.0f;
                Aqk[t * CH + r] = e * dqk;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int t = 0; t < L; t++) {
            float ks = 0.0f, qs = 0.0f;
            for (int i = 0; i < DK; i++) {
                ks = mad(Kc[t * DK + i], sc[i], ks);
                qs = mad(Qc[t * DK + i], sc[i], qs);
            }
            const float eg = exp(gam[t]);
            const float v = qkv[(size_t)(c0 + t) * QKV_DIM + 2 * H_K * DK + h * DV + j];
            float w = bet[t] * (v - eg * ks);
            for (int r = 0; r < t; r++) {
                w = mad(-Akk[t * CH + r], u[r], w);
            }
            u[t] = w;
            float o = eg * qs;
            for (int r = 0; r <= t; r++) {
                o = mad(Aqk[t * CH + r], u[r], o);
            }
            out[(size_t)(c0 + t) * H_V * DV + h * DV + j] = o;
        }
        const float glast = gam[L - 1];
        for (int t = 0; t < L; t++) {
            u[t] *= exp(glast - gam[t]);
        }
        const float elast = exp(glast);
        for (int i = 0; i < DK; i++) {
            float acc = elast * sc[i];
            for (int t = 0; t < L; t++) {
                acc = mad(Kc[t * DK + i], u[t], acc);
            }
            sc[i] = acc;
        }
        barrier(CLK_LOCAL_MEM_FENCE);  // the next chunk overwrites Kc, Qc, gam, bet
    }
    if (cur >= 0) {
        for (int i = 0; i < DK; i++) {
            st[(size_t)i * DV] = sc[i];
        }
    }
}

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:] * silu(z[r, :]) for rows of DV floats
// (one row per token and value head; weight is ssm_norm, shared by the heads). One group per row.
// y may alias x or z.
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_gated_rms_norm(__global const float *x, __global const float *z, __global const float *weight,
                           __global float *y, const float eps) {
    __local float part[WG];
    const size_t base = (size_t)get_group_id(0) * DV;
    const int lid = get_local_id(0);
    float s = 0.0f;
    for (int i = lid; i < DV; i += WG) {
        s = mad(x[base + i], x[base + i], s);
    }
    const float scale = rsqrt(group_sum(s, part) / (float)DV + eps);
    for (int i = lid; i < DV; i += WG) {
        const float zi = z[base + i];
        y[base + i] = x[base + i] * scale * weight[i] * (zi / (1.0f + exp(-zi)));
    }
}
