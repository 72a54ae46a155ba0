// attention.cl - KV-cache store and causal multi-sequence attention with an online softmax.
//
// Cache layout (both K and V, half precision, written with vstore_half_rte):
//     cache[n_seq, n_ctx, n_head_kv, D]; token t of the batch is stored at (seq[t], pos[t]).
//
// kernel_kv_store: k_cache[seq[t], pos[t]] = k[t], v_cache[...] = v[t]   (k, v float [n_tokens, n_head_kv*D])
//     NDRange 2-D (float4 of the row, token t): global = (n_head_kv*D/4, n_tokens), any local size.
//     Tokens with pos/seq outside the cache are not stored (the host bounds them; this keeps a host bug from
//     writing outside the buffer). n_tokens (per step) bounds the grid, which has at least one token row.
//
// kernel_attention: for token t, query head h (kv head g = h / N_REP), with s = seq[t], p = pos[t]:
//     out[t, h] = sum_j softmax_j(scale * q[t, h] . K[s, j, g]) V[s, j, g]     over j = 0..p
//   Each token reads only its own sequence, so a batch may mix sequences (parallel slots) and hold several
//   tokens of one sequence (prompt chunks, drafts); kv_store has run for the whole batch before.
//   NDRange 2-D: dim 0 = token blocks of BQ tokens, WG work-items each; dim 1 = kv heads.
//     global = (ceil(n_tokens / BQ) * WG, n_head_kv), local = (WG, 1).
//   A work-group owns R = BQ * N_REP query rows (BQ tokens x the N_REP query heads that share kv head g), so
//   every K/V tile it brings into local memory serves all of them (GQA and prompt reuse). It walks the
//   distinct sequences of its tokens in increasing order (one pass for a prompt chunk or a single decode
//   token); for each, the tiles of BC positions 0..max position of that sequence's tokens:
//     1. load K and V tile (half -> float) into local memory        [BC, D]
//     2. scores S[r, c] = q_r . K_c (q pre-scaled by scale*log2 e),  -INFINITY where masked: position
//        beyond the row's own, or the row belongs to another sequence  [R, BC]
//     3. online softmax per row in base 2: m' = max(m, max_c S), P = exp2(S - m'), l = l 2^(m-m') + sum P
//     4. O_r = O_r * 2^(m-m') + P_r V; each work-item keeps its share of O in registers
//   and finally writes O_r / l_r. Masked entries must stay -INFINITY: build without fast-math.
//   Rows of tokens past n_tokens, or of another sequence, skip the dot products and the O update, so a decode
//   token alone in a block of BQ costs little more than a block of its own.
//   Work split inside the group (register blocking, as in a GEMM micro-kernel): a load unit is VW positions
//   x VW dims (its K block is transposed in registers, not by scalar stores); a score unit is RB rows x CB
//   vectors of VW columns (one K vector load feeds RB rows, one q value CB vectors); an O unit is RB rows x
//   OB vectors of D (one V load feeds RB rows, one P value OB vectors), kept in registers across tiles.
// Defines: D (head dim), N_REP (n_head / n_head_kv), BQ (tokens per group), BC (positions per tile),
//   WG (work-items), VW (vector width 4/8/16), RB (rows per unit, divides BQ*N_REP), CB (score vectors per
//   unit, divides BC/VW), OB (O vectors per unit, divides D/VW).
//   CPU (PoCL): few work-items with float16 vectors (one AVX-512 register each);
//   GPU: 64 work-items with float4. ops/attention.py::default_shape picks them. PORTABLE_TRANSPOSE forces
//   the plain-C form of the K transpose that compilers other than clang get.
// KV types: K_TYPE / V_TYPE (kv_types.h; default f16) say how kernel_attention reads a cache row; the rows
//   are written by kernel_qkv_prep (kernel_kv_store writes f16 only).
// Sliding window (step35's sliding layers, llama.cpp's LLAMA_SWA_TYPE_STANDARD): with SWA_W defined, token
//   t at position p sees positions j with p - SWA_W < j <= p only; the tiles of a sequence start at the
//   lowest position any of its tokens in the block sees. With KV_RING (kv_types.h) the cache holds KV_RING
//   rows per sequence and position j is read from row j % KV_RING (the host keeps KV_RING >= SWA_W + the
//   largest batch - 1, so no row a token sees was overwritten by a later token of the same step). A row
//   whose valid columns all lie in later tiles keeps m = -INFINITY and skips the tile (step 3).
// Reference: tests/test_ops_attention.py::ref_attention (float64 numpy over the float16 cache).

#include "kv_types.h"

#ifndef VW
#define VW 4
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define floatv CAT(float, VW)
#define vloadv CAT(vload, VW)
#define vstorev CAT(vstore, VW)
#define vload_halfv CAT(vload_half, VW)

__kernel void kernel_kv_store(__global const float *k, __global const float *v, __global half *k_cache,
                              __global half *v_cache, __global const int *pos, __global const int *seq,
                              const int kv_dim, const int n_ctx, const int n_seq, const int n_tokens) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (t >= n_tokens) {
        return;  // the grid has one token row even for an empty batch: never store stale pos/seq
    }
    const int p = pos[t];
    const int s = seq[t];
    if ((uint)p >= (uint)n_ctx || (uint)s >= (uint)n_seq) {
        return;
    }
    const size_t dst = ((size_t)s * n_ctx + p) * kv_dim;
    vstore_half4_rte(vload4(i, k + (size_t)t * kv_dim), i, k_cache + dst);
    vstore_half4_rte(vload4(i, v + (size_t)t * kv_dim), i, v_cache + dst);
}

#ifdef D

#define R (BQ * N_REP)
#define DV (D / VW)                 // vectors per head row
#define CV (BC / VW)                // vectors per tile row of scores
#define NOU ((R / RB) * (DV / OB))  // O units: RB rows x OB vectors of D
#define NO ((NOU + WG - 1) / WG)    // O units per work-item
#define QS (D + 1)                  // Q row stride: padded so that rows start in other local banks
#define KT (BC + VW)                // transposed K tile row stride, padded likewise

#define intv CAT(int, VW)
#if VW == 4
#define IOTA ((int4)(0, 1, 2, 3))
#elif VW == 8
#define IOTA ((int8)(0, 1, 2, 3, 4, 5, 6, 7))
#else
#define IOTA ((int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
#endif

#define ucharv CAT(uchar, VW)
#define charv CAT(char, VW)
#define convert_floatv CAT(convert_float, VW)
#define convert_intv CAT(convert_int, VW)

// Values [dv * VW, dv * VW + VW) of a cache row of `type` (kv_types.h), as floats. VW divides 32, so the
// values sit in one quant block.
inline floatv kv_load(__global const uchar *row, const int dv, const int type) {
    if (type == KV_F16) {
        return vload_halfv(dv, (__global const half *)row);
    }
    const int e0 = dv * VW, blk = e0 / 32, off = e0 % 32;
    if (type == KV_Q8_0) {
        __global const uchar *b = row + 34 * blk;
        return convert_floatv(CAT(vload, VW)(0, (__global const char *)(b + 2 + off))) *
               vload_half(0, (__global const half *)b);
    }
    __global const uchar *b = row + 18 * blk;
    const ucharv q = CAT(vload, VW)(0, b + 2 + (off & 15));
    const intv v = off < 16 ? convert_intv(q & (uchar)15) : convert_intv(q >> (uchar)4);
    return convert_floatv(v - 8) * vload_half(0, (__global const half *)b);
}

inline float hsum(const floatv v) {
#if VW == 4
    const float4 a = v;
#elif VW == 8
    const float4 a = v.lo + v.hi;
#else
    const float8 b = v.lo + v.hi;
    const float4 a = b.lo + b.hi;
#endif
    return (a.s0 + a.s1) + (a.s2 + a.s3);
}

inline float hmax(const floatv v) {
#if VW == 4
    const float4 a = v;
#elif VW == 8
    const float4 a = fmax(v.lo, v.hi);
#else
    const float8 b = fmax(v.lo, v.hi);
    const float4 a = fmax(b.lo, b.hi);
#endif
    return fmax(fmax(a.s0, a.s1), fmax(a.s2, a.s3));
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_attention(__global const float *q, __global const uchar *k_cache, __global const uchar *v_cache,
                      __global const int *pos, __global const int *seq, __global float *out,
                      const int n_head, const int n_head_kv, const int n_ctx, const int n_seq,
                      const float scale, const int n_tokens) {
    __local float Qs[R * QS];   // query rows, pre-scaled by scale * log2(e)
    __local float Kt[D * KT];   // K tile, transposed: Kt[d][c], so scores come out VW columns at a time
    __local float Vs[BC * D];   // V tile: Vs[c][d]
    __local float Sc[R * BC];   // scores, then probabilities (0 where masked)
    __local float m_row[R], l_row[R], a_row[R];
    __local int tok_seq[BQ], tok_pos[BQ];

    const int lid = get_local_id(0);
    const int t0 = get_group_id(0) * BQ;
    const int g = get_group_id(1);
    const float qscale = scale * M_LOG2E_F;

    for (int tl = lid; tl < BQ; tl += WG) {
        const int t = t0 + tl;
        int s = -1, p = -1;
        if (t < n_tokens) {
            s = seq[t];
            p = pos[t];
            if ((uint)s >= (uint)n_seq || (uint)p >= (uint)n_ctx) {
                s = -1;  // outside the cache: left out, its output row becomes NaN (l = 0)
            }
        }
        tok_seq[tl] = s;
        tok_pos[tl] = p;
    }
    for (int u = lid; u < R * DV; u += WG) {
        const int r = u / DV, dv = u % DV;
        const int t = t0 + r / N_REP;
        const int h = g * N_REP + r % N_REP;
        vstorev(t < n_tokens ? vloadv(dv, q + ((size_t)t * n_head + h) * D) * qscale : (floatv)(0.0f),
                0, Qs + r * QS + dv * VW);
    }
    for (int r = lid; r < R; r += WG) {
        m_row[r] = -INFINITY;
        l_row[r] = 0.0f;
    }
    floatv acc[NO][RB][OB];
    #pragma unroll
    for (int i = 0; i < NO; i++) {
        #pragma unroll
        for (int k = 0; k < RB; k++) {
            #pragma unroll
            for (int b = 0; b < OB; b++) acc[i][k][b] = (floatv)(0.0f);
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    // bytes between consecutive positions of one sequence
    const size_t k_pos_stride = (size_t)n_head_kv * KV_ROW_BYTES(K_TYPE, D);
    const size_t v_pos_stride = (size_t)n_head_kv * KV_ROW_BYTES(V_TYPE, D);
    int s_prev = -1;
    for (;;) {
        // the next sequence present in this block, and how far its tokens reach (same on every work-item)
        int s_cur = INT_MAX;
        for (int tl = 0; tl < BQ; tl++) {
            const int s = tok_seq[tl];
            if (s > s_prev && s < s_cur) s_cur = s;
        }
        if (s_cur == INT_MAX) {
            break;
        }
        int max_pos = -1;
        int min_pos = INT_MAX;
        for (int tl = 0; tl < BQ; tl++) {
            if (tok_seq[tl] == s_cur) {
                max_pos = max(max_pos, tok_pos[tl]);
                min_pos = min(min_pos, tok_pos[tl]);
            }
        }
#ifdef SWA_W
        const int j_start = max(0, min_pos - SWA_W + 1);
#else
        const int j_start = 0;
#endif
        s_prev = s_cur;
        __global const uchar *kb =
            k_cache + (size_t)s_cur * KV_SEQ_ROWS(n_ctx) * k_pos_stride + (size_t)g * KV_ROW_BYTES(K_TYPE, D);
        __global const uchar *vb =
            v_cache + (size_t)s_cur * KV_SEQ_ROWS(n_ctx) * v_pos_stride + (size_t)g * KV_ROW_BYTES(V_TYPE, D);

        for (int j0 = j_start; j0 <= max_pos; j0 += BC) {
            barrier(CLK_LOCAL_MEM_FENCE);  // the previous tile is no longer read
            // 1. K, V tile; positions past max_pos are zero (P is 0 there, and 0 * garbage could be NaN).
            //    A unit is VW positions x VW dims; its K block is transposed in registers.
            for (int u = lid; u < CV * DV; u += WG) {
                const int cb = u / DV, dv = u % DV;
#if defined(__clang__) && !defined(PORTABLE_TRANSPOSE)
                // vector subscripts (a clang extension): the transpose compiles to register shuffles
                floatv kr[VW];
                #pragma unroll
                for (int e = 0; e < VW; e++) {
                    const int c = cb * VW + e;
                    const int j = j0 + c;
                    floatv vv = (floatv)(0.0f);
                    kr[e] = (floatv)(0.0f);
                    if (j <= max_pos) {
                        kr[e] = kv_load(kb + KV_SLOT(j) * k_pos_stride, dv, K_TYPE);
                        vv = kv_load(vb + KV_SLOT(j) * v_pos_stride, dv, V_TYPE);
                    }
                    vstorev(vv, dv, Vs + c * D);
                }
                #pragma unroll
                for (int f = 0; f < VW; f++) {
                    floatv col;
                    #pragma unroll
                    for (int e = 0; e < VW; e++) col[e] = kr[e][f];
                    vstorev(col, cb, Kt + (dv * VW + f) * KT);
                }
#else
                // plain OpenCL C: through a private array (on PoCL ~15% slower than the form above)
                float kr[VW][VW];  // [position][dim]
                #pragma unroll
                for (int e = 0; e < VW; e++) {
                    const int c = cb * VW + e;
                    const int j = j0 + c;
                    floatv kv = (floatv)(0.0f), vv = (floatv)(0.0f);
                    if (j <= max_pos) {
                        kv = kv_load(kb + KV_SLOT(j) * k_pos_stride, dv, K_TYPE);
                        vv = kv_load(vb + KV_SLOT(j) * v_pos_stride, dv, V_TYPE);
                    }
                    vstorev(kv, 0, kr[e]);
                    vstorev(vv, dv, Vs + c * D);
                }
                #pragma unroll
                for (int f = 0; f < VW; f++) {
                    float col[VW];
                    #pragma unroll
                    for (int e = 0; e < VW; e++) col[e] = kr[e][f];
                    vstorev(vloadv(0, col), cb, Kt + (dv * VW + f) * KT);
                }
#endif
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            // 2. scores of RB rows x CB column vectors per unit (each K load serves RB rows, each q value CB
            //    vectors); -INFINITY past a row's position or for rows of another sequence
            for (int u = lid; u < (R / RB) * (CV / CB); u += WG) {
                const int rb = u / (CV / CB), cb = u % (CV / CB);
                int last[RB];
#ifdef SWA_W
                int first[RB];  // first valid column (the window's start)
#endif
                bool any = false;
                #pragma unroll
                for (int k = 0; k < RB; k++) {
                    const int tl = (rb * RB + k) / N_REP;
                    last[k] = tok_seq[tl] == s_cur ? tok_pos[tl] - j0 : -1;  // last valid column
#ifdef SWA_W
                    first[k] = tok_pos[tl] - SWA_W + 1 - j0;
#endif
                    any |= last[k] >= cb * CB * VW;
                }
                floatv d[RB][CB];
                #pragma unroll
                for (int k = 0; k < RB; k++) {
                    #pragma unroll
                    for (int b = 0; b < CB; b++) d[k][b] = (floatv)(0.0f);
                }
                if (any) {
                    __local const float *qr = Qs + rb * RB * QS;
                    __local const float *kt = Kt + cb * CB * VW;
                    for (int e = 0; e < D; e++) {
                        floatv kv[CB];
                        #pragma unroll
                        for (int b = 0; b < CB; b++) kv[b] = vloadv(b, kt + e * KT);
                        #pragma unroll
                        for (int k = 0; k < RB; k++) {
                            const floatv qe = (floatv)(qr[k * QS + e]);
                            #pragma unroll
                            for (int b = 0; b < CB; b++) d[k][b] = mad(qe, kv[b], d[k][b]);
                        }
                    }
                }
                #pragma unroll
                for (int k = 0; k < RB; k++) {
                    #pragma unroll
                    for (int b = 0; b < CB; b++) {
                        const int cv = cb * CB + b;
#ifdef SWA_W
                        const intv col = (intv)(cv * VW) + IOTA;
                        const intv valid = (col <= (intv)(last[k])) & (col >= (intv)(first[k]));
#else
                        const intv valid = (intv)(cv * VW) + IOTA <= (intv)(last[k]);
#endif
                        vstorev(select((floatv)(-INFINITY), d[k][b], valid), cv, Sc + (rb * RB + k) * BC);
                    }
                }
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            // 3. online softmax per row. Rows without a valid column in this tile get alpha 1 and P 0, so
            //    that step 4 may treat every row of a block alike. Without SWA_W every row of s_cur has
            //    position 0 valid, so m is finite from tile 0 on; with it, a row's first tiles may hold no
            //    valid column (ncv = 0 there), and m is finite from its first valid tile on.
            for (int r = lid; r < R; r += WG) {
                const int tl = r / N_REP;
                const int last = tok_seq[tl] == s_cur ? tok_pos[tl] - j0 : -1;
#ifdef SWA_W
                const int first = max(0, tok_pos[tl] - SWA_W + 1 - j0);
                const int ncv = last < first || first >= BC ? 0 : min(CV, last / VW + 1);
                const int cv0 = ncv > 0 ? first / VW : 0;  // vectors before it hold no valid column
#else
                const int ncv = last < 0 ? 0 : min(CV, last / VW + 1);  // vectors holding valid columns
                const int cv0 = 0;
#endif
                __local float *sr = Sc + r * BC;
                float alpha = 1.0f;
                for (int cv = 0; cv < cv0; cv++) vstorev((floatv)(0.0f), cv, sr);
                if (ncv > 0) {
                    floatv mv = (floatv)(m_row[r]);
                    for (int cv = cv0; cv < ncv; cv++) mv = fmax(mv, vloadv(cv, sr));
                    const float mx = hmax(mv);
                    floatv sum = (floatv)(0.0f);
                    for (int cv = cv0; cv < ncv; cv++) {
                        const floatv e = exp2(vloadv(cv, sr) - (floatv)(mx));
                        vstorev(e, cv, sr);
                        sum += e;
                    }
                    alpha = exp2(m_row[r] - mx);  // exp2(-inf) = 0 on the first tile
                    l_row[r] = l_row[r] * alpha + hsum(sum);
                    m_row[r] = mx;
                }
                a_row[r] = alpha;
                for (int cv = ncv; cv < CV; cv++) vstorev((floatv)(0.0f), cv, sr);
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            // 4. O update: a unit is RB rows x OB vectors of D; each V load serves RB rows, each P value OB
            #pragma unroll
            for (int i = 0; i < NO; i++) {
                const int u = lid + i * WG;
                if (NOU % WG == 0 || u < NOU) {
                    const int rb = u / (DV / OB), ob = u % (DV / OB);
                    int cn = 0;  // columns valid for any row of the block
                    #pragma unroll
                    for (int k = 0; k < RB; k++) {
                        const int tl = (rb * RB + k) / N_REP;
                        if (tok_seq[tl] == s_cur) cn = max(cn, min(BC, tok_pos[tl] - j0 + 1));
                    }
                    if (cn > 0) {
                        #pragma unroll
                        for (int k = 0; k < RB; k++) {
                            #pragma unroll
                            for (int b = 0; b < OB; b++) acc[i][k][b] *= a_row[rb * RB + k];
                        }
                        __local const float *sr = Sc + rb * RB * BC;
                        __local const float *vs = Vs + ob * OB * VW;
                        for (int c = 0; c < cn; c++) {
                            floatv vv[OB];
                            #pragma unroll
                            for (int b = 0; b < OB; b++) vv[b] = vloadv(b, vs + c * D);
                            #pragma unroll
                            for (int k = 0; k < RB; k++) {
                                const floatv pk = (floatv)(sr[k * BC + c]);
                                #pragma unroll
                                for (int b = 0; b < OB; b++) acc[i][k][b] = mad(pk, vv[b], acc[i][k][b]);
                            }
                        }
                    }
                }
            }
        }
    }
    // l_row was last written before the barrier that precedes step 4
    #pragma unroll
    for (int i = 0; i < NO; i++) {
        const int u = lid + i * WG;
        if (NOU % WG == 0 || u < NOU) {
            const int rb = u / (DV / OB), ob = u % (DV / OB);
            #pragma unroll
            for (int k = 0; k < RB; k++) {
                const int r = rb * RB + k;
                const int t = t0 + r / N_REP;
                const int h = g * N_REP + r % N_REP;
                if (t < n_tokens) {
                    #pragma unroll
                    for (int b = 0; b < OB; b++) {
                        vstorev(acc[i][k][b] / l_row[r], ob * OB + b, out + ((size_t)t * n_head + h) * D);
                    }
                }
            }
        }
    }
}

#endif  // D
