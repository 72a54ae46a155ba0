// attention.cl - KV-cache store and causal multi-sequence attention with an online softmax.
//
// Cache layout (both K and V; kv_types.h: KV_ROW): cache[n_seq, n_head_kv, n_ctx, D], head-major, so that the
// positions one kv head walks are one contiguous stream; token t of the batch is stored at (seq[t], g, pos[t])
// for each kv head g.
//
// kernel_kv_store: k_cache[seq[t], g, pos[t]] = k[t, g], v_cache[...] = v[t, g] (half, vstore_half_rte;
//     k, v float [n_tokens, n_head_kv*D])
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
//   A row (one token's query head) walks its sequence's positions in tiles of BC from position 0 (or its
//   window's start, below), with an online softmax in base 2 (q pre-scaled by scale * log2 e):
//     1. scores S[c] = hsum(fma chain over the row's D/VW vectors of q and K_c), -INFINITY where masked
//     2. m' = max(m, max_c S), P = exp2(S - m'), l = fma(l, 2^(m-m'), sum P) (VW-lane sums, then hsum)
//     3. O = O * 2^(m-m'), then O = fma(P_c, V_c, O) over the tile's columns in order
//   The walk restarts at every multiple of KV_SPLIT positions (a split): each split's (m, l, O) starts empty
//   and is folded into the row's running (M, L, O_run) in split order (fold_split); the output is O_run / L.
//   A row's first split folds exactly (M = -INFINITY: O_run = O, L = l), so below KV_SPLIT positions this is
//   the plain walk. Masked entries must stay -INFINITY: build without fast-math.
//   Flash-decoding: launched with a third dimension of n_split > 1 groups (a decode or verify step at a long
//   context, when the other two dimensions leave the device idle), group z walks split z only and writes
//   its rows' (M, L, O_run) to part_ml / part_o [z, t, h]; kernel_attention_combine then folds the splits
//   of each row in order with the same fold_split, so a row's bits are the same whether or not it was split.
//   Every row's arithmetic is this, whatever else is in the batch and whichever path below runs it, so a
//   request's output is bit-identical alone, batched with other slots' tokens and prompt chunks, and in a
//   speculative verify step (explicit fma, so that -cl-mad-enable cannot contract one path differently).
//   Two paths, chosen per work-group (both run the arithmetic above):
//   - decode (DEC_T defined, CPU): when every sequence of the block has at most DEC_T tokens (one decode
//     token per slot, a verify step), one work-item per sequence holds that sequence's rows in registers and
//     reads each K and V row once, straight from the cache: no local memory, no barrier.
//   - tiled (prompt chunks): a work-group owns R = BQ * N_REP query rows (BQ tokens x the N_REP query heads
//     that share kv head g), so every K/V tile it brings into local memory serves all of them (GQA and prompt
//     reuse). It walks the distinct sequences of its tokens in increasing order; for each, the tiles up to the
//     max position of that sequence's tokens: load the K and V tile (half -> float) into local memory; the
//     scores (a unit is RB rows x CB*VW columns: one K vector load feeds RB rows); the softmax per row; the O
//     update (a unit is RB rows x OB vectors of D: one V load feeds RB rows, one P value OB vectors, kept in
//     registers across tiles). Rows of tokens past n_tokens, or of another sequence, skip the dot products
//     and the O update.
// Defines: D (head dim), N_REP (n_head / n_head_kv), BQ (tokens per group), BC (positions per tile),
//   WG (work-items), VW (vector width 4/8/16), RB (rows per unit, divides BQ*N_REP), CB (score vectors per
//   unit, divides BC/VW), OB (O vectors per unit, divides D/VW), DEC_T (the decode path's tokens per
//   sequence; undefined: tiled path only), KS (the K tile's row stride), KV_SPLIT (positions per split, a
//   multiple of BC), GATE_ROW (qwen35's output gate; see gated()). BC, VW and KV_SPLIT fix the arithmetic; the others only share out the work or lay out
//   local memory.
//   CPU (PoCL): few work-items with float16 vectors (one AVX-512 register each), the decode path;
//   GPU: 64 work-items with float4, the tiled path. ops/attention.py::default_shape picks them.
// KV types: K_TYPE / V_TYPE (kv_types.h; default f16) say how kernel_attention reads a cache row; the rows
//   are written by kernel_qkv_prep (kernel_kv_store writes f16 only).
// Sliding window (step35's sliding layers, llama.cpp's LLAMA_SWA_TYPE_STANDARD): with SWA_W defined, token
//   t at position p sees positions j with p - SWA_W < j <= p only; the tiles of a sequence start at the
//   lowest position any of its tokens in the block sees. With KV_RING (kv_types.h) the cache holds KV_RING
//   rows per sequence and position j is read from row j % KV_RING (the host keeps KV_RING >= SWA_W + the
//   largest batch - 1, so no row a token sees was overwritten by a later token of the same step). A row
//   whose valid columns all lie in later tiles keeps m = -INFINITY and skips the tile (step 2).
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
                              const int kv_dim, const int head_dim, const int n_ctx, const int n_seq,
                              const int n_tokens) {
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
    const int g = i * 4 / head_dim, c = i - g * (head_dim / 4);  // kv head g, float4 c of its row
    const size_t dst = KV_ROW(s, g, p, kv_dim / head_dim, n_ctx) * head_dim;
    vstore_half4_rte(vload4(i, k + (size_t)t * kv_dim), c, k_cache + dst);
    vstore_half4_rte(vload4(i, v + (size_t)t * kv_dim), c, v_cache + dst);
}

#ifdef D

#define R (BQ * N_REP)
#define DV (D / VW)                 // vectors per head row
#define CV (BC / VW)                // vectors per tile row of scores
#define SC (CB * VW)                // columns per score unit
#define NOU ((R / RB) * (DV / OB))  // O units: RB rows x OB vectors of D
#define NO ((NOU + WG - 1) / WG)    // O units per work-item

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

// A whole cache row (DV vectors) of `type`, for the decode path.
inline void kv_load_row(floatv *r, __global const uchar *row, const int type) {
    #pragma unroll
    for (int dv = 0; dv < DV; dv++) r[dv] = kv_load(row, dv, type);
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

// THE PER-ROW ARITHMETIC (both paths; a row is one token's query head):
// A score is hsum of the fma chain, over the row's DV vectors in order, of (q * scale * log2 e) and K.
inline float score(const floatv *qr, const floatv *kr) {
    floatv d = (floatv)(0.0f);
    #pragma unroll
    for (int dv = 0; dv < DV; dv++) d = fma(qr[dv], kr[dv], d);
    return hsum(d);
}

// One tile of a row's online softmax: the scores sr[0..BC) (-INFINITY where masked) become probabilities
// (0 where masked or outside [first, last], the row's valid columns in this tile); m, l updated; returns the
// factor for the row's O. A row without a valid column in this tile gets alpha 1 and P 0.
inline float softmax_tile(float *sr, float *m, float *l, const int first, const int last) {
    const int ncv = last < first || first >= BC ? 0 : min(CV, last / VW + 1);  // vectors holding valid columns
    const int cv0 = ncv > 0 ? first / VW : 0;  // vectors before it hold no valid column
    float alpha = 1.0f;
    for (int cv = 0; cv < cv0; cv++) vstorev((floatv)(0.0f), cv, sr);
    if (ncv > 0) {
        floatv mv = (floatv)(*m);
        for (int cv = cv0; cv < ncv; cv++) mv = fmax(mv, vloadv(cv, sr));
        const float mx = hmax(mv);
        floatv sum = (floatv)(0.0f);
        for (int cv = cv0; cv < ncv; cv++) {
            const floatv e = exp2(vloadv(cv, sr) - (floatv)(mx));
            vstorev(e, cv, sr);
            sum += e;
        }
        alpha = exp2(*m - mx);  // exp2(-inf) = 0 on the first tile
        *l = fma(*l, alpha, hsum(sum));
        *m = mx;
    }
    for (int cv = max(ncv, cv0); cv < CV; cv++) vstorev((floatv)(0.0f), cv, sr);
    return alpha;
}

// THE SPLIT FOLD (both paths and kernel_attention_combine): a split's (m, l) into a row's running (M, L); the
// row's O_run becomes fma(O_run, a, O * b). A split without a valid column for the row (m = -INFINITY) is
// skipped (returns false).
inline bool fold_split(float *M, float *L, const float m, const float l, float *a, float *b) {
    if (m == -INFINITY) {
        return false;
    }
    const float mx = fmax(*M, m);
    *a = exp2(*M - mx);  // 0 on the row's first split
    *b = exp2(m - mx);
    *L = fma(*L, *a, l * *b);
    *M = mx;
    return true;
}

// The partials' row of token t's head h at split z: part_o[row, :D], part_ml[row, 0..1]
inline size_t part_row(const int z, const int part_tokens, const int t, const int h, const int n_head) {
    return ((size_t)z * part_tokens + t) * n_head + h;
}

// A row's (M, L, O_run) at split z of a split launch: part_o[z, t, h, :], part_ml[z, t, h, 0..1]
inline void put_partial(__global float *part_o, __global float *part_ml, const int z, const int part_tokens,
                        const int t, const int h, const int n_head, const floatv *o, const float M,
                        const float L) {
    const size_t row = part_row(z, part_tokens, t, h, n_head);
    #pragma unroll
    for (int dv = 0; dv < DV; dv++) vstorev(o[dv], dv, part_o + row * D);
    part_ml[2 * row] = M;
    part_ml[2 * row + 1] = L;
}

// qwen35's gated attention (GATE_ROW defined): a head's output times the sigmoid of its gate values, which
// follow Q head h in token t's projection row of GATE_ROW floats (ops/qkv.py's Q_GATE layout). Every path
// and the combine kernel write through this, so the gate costs no launch of its own.
inline floatv gated(const floatv o, __global const float *gate, const int t, const int h, const int dv) {
#ifdef GATE_ROW
    const floatv g = vloadv(dv, gate + (size_t)t * GATE_ROW + (size_t)h * 2 * D + D);
    return o * (1.0f / (1.0f + exp(-g)));
#else
    return o;
#endif
}

// the first valid column of a row at position p in the tile at j0 (its window's start), clamped at 0
#ifdef SWA_W
#define FIRST_COL(p, j0) max(0, (p) - SWA_W + 1 - (j0))
#else
#define FIRST_COL(p, j0) 0
#endif

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_attention(__global const float *q, __global const uchar *k_cache, __global const uchar *v_cache,
                      __global const int *pos, __global const int *seq, __global float *out,
                      const int n_head, const int n_head_kv, const int n_ctx, const int n_seq,
                      const float scale, const int n_tokens, __global float *part_o, __global float *part_ml,
                      const int part_tokens, __global const float *gate) {
    __local int tok_seq[BQ], tok_pos[BQ];
    __local float Qs[R * D];    // tiled path: query rows, pre-scaled by scale * log2(e)
    __local float Ks[BC * KS];  // K tile: Ks[c][d], rows KS apart
    __local float Vs[BC * D];   // V tile: Vs[c][d]
    __local float Sc[R * BC];   // scores, then probabilities (0 where masked)
    __local float m_row[R], l_row[R], a_row[R], M_row[R], L_row[R];

    const int lid = get_local_id(0);
    const int t0 = get_group_id(0) * BQ;
    const int g = get_group_id(1);
    const int n_split = get_num_groups(2);  // > 1: a split launch, this group walks split z only
    const int z = get_group_id(2);
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
    barrier(CLK_LOCAL_MEM_FENCE);

    // consecutive positions of one sequence and kv head are consecutive rows (kv_types.h: KV_ROW)
    const size_t k_pos_stride = KV_ROW_BYTES(K_TYPE, D);
    const size_t v_pos_stride = KV_ROW_BYTES(V_TYPE, D);

#ifdef DEC_T
    // The decode path, when every sequence of the block has at most DEC_T tokens (a decode token per slot, a
    // speculative verify step): work-item tl takes the sequence whose first token in the block is tl, with
    // all of that sequence's tokens, and reads each K and V row once, straight from the cache into registers.
    bool small = true;  // the same on every work-item
    for (int a = 0; a < BQ; a++) {
        int n = 0;
        for (int b = 0; b < BQ; b++) n += tok_seq[b] == tok_seq[a];
        small &= tok_seq[a] < 0 || n <= DEC_T;
    }
    if (small) {  // no barrier inside: PoCL's work-group compiler cannot take one in this branch
        bool lead = lid < BQ && tok_seq[lid] >= 0;
        for (int b = 0; b < lid && lead; b++) lead = tok_seq[b] != tok_seq[lid];
        if (lid < BQ && tok_seq[lid] < 0 && t0 + lid < n_tokens) {  // outside the cache: NaN, as the tiled path
            for (int h = g * N_REP; h < g * N_REP + N_REP; h++) {
                floatv o[DV];
                for (int dv = 0; dv < DV; dv++) o[dv] = n_split > 1 ? (floatv)(0.0f) : (floatv)(NAN);
                if (n_split > 1) {  // no split of the row (M -INFINITY, L 0): the combine gives 0 / 0
                    put_partial(part_o, part_ml, z, part_tokens, t0 + lid, h, n_head, o, -INFINITY, 0.0f);
                } else {
                    for (int dv = 0; dv < DV; dv++) vstorev(o[dv], dv, out + ((size_t)(t0 + lid) * n_head + h) * D);
                }
            }
        }
        if (lead) {
            const int s = tok_seq[lid];
            int row_pos[DEC_T * N_REP], row_tok[DEC_T * N_REP];
            int nr = 0, max_pos = -1, min_pos = INT_MAX;
            for (int b = lid; b < BQ; b++) {
                if (tok_seq[b] == s) {
                    for (int k = 0; k < N_REP; k++, nr++) {
                        row_tok[nr] = t0 + b;
                        row_pos[nr] = tok_pos[b];
                    }
                    max_pos = max(max_pos, tok_pos[b]);
                    min_pos = min(min_pos, tok_pos[b]);
                }
            }
            floatv qv[DEC_T * N_REP][DV], acc[DEC_T * N_REP][DV], o_run[DEC_T * N_REP][DV];
            float m[DEC_T * N_REP], l[DEC_T * N_REP], M[DEC_T * N_REP], L[DEC_T * N_REP], sc[DEC_T * N_REP][BC];
            for (int k = 0; k < nr; k++) {
                const int h = g * N_REP + k % N_REP;
                #pragma unroll
                for (int dv = 0; dv < DV; dv++) {
                    qv[k][dv] = vloadv(dv, q + ((size_t)row_tok[k] * n_head + h) * D) * qscale;
                    o_run[k][dv] = (floatv)(0.0f);
                }
                M[k] = -INFINITY;
                L[k] = 0.0f;
            }
            __global const uchar *kb = k_cache + KV_ROW(s, g, 0, n_head_kv, n_ctx) * k_pos_stride;
            __global const uchar *vb = v_cache + KV_ROW(s, g, 0, n_head_kv, n_ctx) * v_pos_stride;
#ifdef SWA_W
            const int j_start = max(0, min_pos - SWA_W + 1) / BC * BC;  // tiles at multiples of BC, as every row's
#else
            const int j_start = 0;
#endif
            for (int zs = n_split > 1 ? z : j_start / KV_SPLIT; zs <= (n_split > 1 ? z : max_pos / KV_SPLIT); zs++) {
                for (int k = 0; k < nr; k++) {
                    #pragma unroll
                    for (int dv = 0; dv < DV; dv++) acc[k][dv] = (floatv)(0.0f);
                    m[k] = -INFINITY;
                    l[k] = 0.0f;
                }
                for (int j0 = max(j_start, zs * KV_SPLIT); j0 <= min(max_pos, zs * KV_SPLIT + KV_SPLIT - 1); j0 += BC) {
                    const int cn = min(BC, max_pos - j0 + 1);  // columns valid for some row
                    for (int c = 0; c < cn; c++) {
                        floatv kr[DV];
                        kv_load_row(kr, kb + KV_SLOT(j0 + c) * k_pos_stride, K_TYPE);
                        for (int k = 0; k < nr; k++) {
                            const bool valid = c >= FIRST_COL(row_pos[k], j0) && c <= row_pos[k] - j0;
                            sc[k][c] = valid ? score(qv[k], kr) : -INFINITY;
                        }
                    }
                    for (int k = 0; k < nr; k++) {
                        for (int c = cn; c < BC; c++) sc[k][c] = -INFINITY;
                        const float alpha =
                            softmax_tile(sc[k], &m[k], &l[k], FIRST_COL(row_pos[k], j0), row_pos[k] - j0);
                        #pragma unroll
                        for (int dv = 0; dv < DV; dv++) acc[k][dv] *= alpha;
                    }
                    for (int c = 0; c < cn; c++) {
                        floatv vr[DV];
                        kv_load_row(vr, vb + KV_SLOT(j0 + c) * v_pos_stride, V_TYPE);
                        for (int k = 0; k < nr; k++) {
                            const floatv pk = (floatv)(sc[k][c]);
                            #pragma unroll
                            for (int dv = 0; dv < DV; dv++) acc[k][dv] = fma(pk, vr[dv], acc[k][dv]);
                        }
                    }
                }
                for (int k = 0; k < nr; k++) {  // the split into the running state
                    float a, b;
                    if (fold_split(&M[k], &L[k], m[k], l[k], &a, &b)) {
                        #pragma unroll
                        for (int dv = 0; dv < DV; dv++) o_run[k][dv] = fma(o_run[k][dv], (floatv)(a), acc[k][dv] * b);
                    }
                }
            }
            for (int k = 0; k < nr; k++) {
                const int h = g * N_REP + k % N_REP;
                if (n_split > 1) {
                    put_partial(part_o, part_ml, z, part_tokens, row_tok[k], h, n_head, o_run[k], M[k], L[k]);
                } else {
                    __global float *o = out + ((size_t)row_tok[k] * n_head + h) * D;
                    #pragma unroll
                    for (int dv = 0; dv < DV; dv++) vstorev(gated(o_run[k][dv] / L[k], gate, row_tok[k], h, dv), dv, o);
                }
            }
        }
    }
#else
    const bool small = false;
#endif

    // The tiled path (prompt chunks; a block the decode path took finds no sequence to walk)
    for (int u = lid; u < R * DV; u += WG) {
        const int r = u / DV, dv = u % DV;
        const int t = t0 + r / N_REP;
        const int h = g * N_REP + r % N_REP;
        vstorev(t < n_tokens ? vloadv(dv, q + ((size_t)t * n_head + h) * D) * qscale : (floatv)(0.0f),
                0, Qs + r * D + dv * VW);
    }
    for (int r = lid; r < R; r += WG) {
        m_row[r] = -INFINITY;
        l_row[r] = 0.0f;
        M_row[r] = -INFINITY;
        L_row[r] = 0.0f;
    }
    floatv acc[NO][RB][OB], o_run[NO][RB][OB];
    #pragma unroll
    for (int i = 0; i < NO; i++) {
        #pragma unroll
        for (int k = 0; k < RB; k++) {
            #pragma unroll
            for (int b = 0; b < OB; b++) {
                acc[i][k][b] = (floatv)(0.0f);
                o_run[i][k][b] = (floatv)(0.0f);
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    int s_prev = small ? INT_MAX : -1;
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
        const int j_start = max(0, min_pos - SWA_W + 1) / BC * BC;  // tiles at multiples of BC, as every row's
#else
        const int j_start = 0;
#endif
        s_prev = s_cur;
        __global const uchar *kb = k_cache + KV_ROW(s_cur, g, 0, n_head_kv, n_ctx) * k_pos_stride;
        __global const uchar *vb = v_cache + KV_ROW(s_cur, g, 0, n_head_kv, n_ctx) * v_pos_stride;

        for (int zs = n_split > 1 ? z : j_start / KV_SPLIT; zs <= (n_split > 1 ? z : max_pos / KV_SPLIT); zs++) {
            for (int j0 = max(j_start, zs * KV_SPLIT); j0 <= min(max_pos, zs * KV_SPLIT + KV_SPLIT - 1); j0 += BC) {
                barrier(CLK_LOCAL_MEM_FENCE);  // the previous tile is no longer read
                // 1. K, V tile; positions past max_pos are zero (P is 0 there, and 0 * garbage could be NaN)
                for (int u = lid; u < BC * DV; u += WG) {
                    const int c = u / DV, dv = u % DV;
                    const int j = j0 + c;
                    const bool in = j <= max_pos;
                    vstorev(in ? kv_load(kb + KV_SLOT(j) * k_pos_stride, dv, K_TYPE) : (floatv)(0.0f), dv, Ks + c * KS);
                    vstorev(in ? kv_load(vb + KV_SLOT(j) * v_pos_stride, dv, V_TYPE) : (floatv)(0.0f), dv, Vs + c * D);
                }
                barrier(CLK_LOCAL_MEM_FENCE);
                // 2. scores of RB rows x SC columns per unit (each K vector serves RB rows); -INFINITY outside a
                //    row's valid columns or for rows of another sequence
                for (int u = lid; u < (R / RB) * (BC / SC); u += WG) {
                    const int rb = u / (BC / SC), cb = u % (BC / SC);
                    int first[RB], last[RB];
                    bool any = false;
                    #pragma unroll
                    for (int k = 0; k < RB; k++) {
                        const int tl = (rb * RB + k) / N_REP;
                        last[k] = tok_seq[tl] == s_cur ? tok_pos[tl] - j0 : -1;  // last valid column
                        first[k] = FIRST_COL(tok_pos[tl], j0);
                        any |= last[k] >= cb * SC;
                    }
                    for (int c = cb * SC; c < cb * SC + SC; c++) {
                        floatv d[RB];
                        #pragma unroll
                        for (int k = 0; k < RB; k++) d[k] = (floatv)(0.0f);
                        if (any) {
                            #pragma unroll
                            for (int dv = 0; dv < DV; dv++) {
                                const floatv kv = vloadv(dv, Ks + c * KS);
                                #pragma unroll
                                for (int k = 0; k < RB; k++) d[k] = fma(vloadv(dv, Qs + (rb * RB + k) * D), kv, d[k]);
                            }
                        }
                        #pragma unroll
                        for (int k = 0; k < RB; k++) {
                            Sc[(rb * RB + k) * BC + c] = c >= first[k] && c <= last[k] ? hsum(d[k]) : -INFINITY;
                        }
                    }
                }
                barrier(CLK_LOCAL_MEM_FENCE);
                // 3. online softmax per row (rows of another sequence: no valid column, alpha 1, P 0)
                for (int r = lid; r < R; r += WG) {
                    const int tl = r / N_REP;
                    const int last = tok_seq[tl] == s_cur ? tok_pos[tl] - j0 : -1;
                    float sr[BC], m = m_row[r], l = l_row[r];
                    for (int cv = 0; cv < CV; cv++) vstorev(vloadv(cv, Sc + r * BC), cv, sr);
                    a_row[r] = softmax_tile(sr, &m, &l, FIRST_COL(tok_pos[tl], j0), last);
                    for (int cv = 0; cv < CV; cv++) vstorev(vloadv(cv, sr), cv, Sc + r * BC);
                    m_row[r] = m;
                    l_row[r] = l;
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
                                    for (int b = 0; b < OB; b++) acc[i][k][b] = fma(pk, vv[b], acc[i][k][b]);
                                }
                            }
                        }
                    }
                }
            }
            // 5. the split into the running state: each O unit with its rows' factors (m_row, l_row were written
            //    before the barrier that precedes step 4), then each row's M, L; rows of another sequence have
            //    m = -INFINITY and are left alone
            #pragma unroll
            for (int i = 0; i < NO; i++) {
                const int u = lid + i * WG;
                if (NOU % WG == 0 || u < NOU) {
                    const int rb = u / (DV / OB);
                    #pragma unroll
                    for (int k = 0; k < RB; k++) {
                        const int r = rb * RB + k;
                        float Mr = M_row[r], Lr = L_row[r], a, b;
                        if (fold_split(&Mr, &Lr, m_row[r], l_row[r], &a, &b)) {
                            #pragma unroll
                            for (int ob = 0; ob < OB; ob++) o_run[i][k][ob] = fma(o_run[i][k][ob], (floatv)(a), acc[i][k][ob] * b);
                        }
                        #pragma unroll
                        for (int ob = 0; ob < OB; ob++) acc[i][k][ob] = (floatv)(0.0f);
                    }
                }
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int r = lid; r < R; r += WG) {
                float Mr = M_row[r], Lr = L_row[r], a, b;
                fold_split(&Mr, &Lr, m_row[r], l_row[r], &a, &b);
                M_row[r] = Mr;
                L_row[r] = Lr;
                m_row[r] = -INFINITY;
                l_row[r] = 0.0f;
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);  // the last fold's M_row, L_row
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
                if (t < n_tokens && !small && n_split > 1) {  // this split's partial of the row
                    const size_t row = part_row(z, part_tokens, t, h, n_head);
                    #pragma unroll
                    for (int b = 0; b < OB; b++) vstorev(o_run[i][k][b], ob * OB + b, part_o + row * D);
                    if (ob == 0) {
                        part_ml[2 * row] = M_row[r];
                        part_ml[2 * row + 1] = L_row[r];
                    }
                } else if (t < n_tokens && !small) {
                    #pragma unroll
                    for (int b = 0; b < OB; b++) {
                        vstorev(gated(o_run[i][k][b] / L_row[r], gate, t, h, ob * OB + b), ob * OB + b,
                                out + ((size_t)t * n_head + h) * D);
                    }
                }
            }
        }
    }
}

// kernel_attention_combine: out[t, h] = O_run / L over the splits z < n_split of a split launch's partials
//   (fold_split in split order, as the unsplit walk folds them). NDRange 3-D: (DV vectors of a head row,
//   n_head, n_tokens); any local size.
__kernel void kernel_attention_combine(__global const float *part_o, __global const float *part_ml,
                                       __global float *out, const int n_head, const int part_tokens,
                                       const int n_split, const int n_tokens, __global const float *gate) {
    const int dv = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
    if (dv >= DV || h >= n_head || t >= n_tokens) {
        return;
    }
    float M = -INFINITY, L = 0.0f;
    floatv o = (floatv)(0.0f);
    for (int zs = 0; zs < n_split; zs++) {
        const size_t row = part_row(zs, part_tokens, t, h, n_head);
        float a, b;
        if (fold_split(&M, &L, part_ml[2 * row], part_ml[2 * row + 1], &a, &b)) {
            o = fma(o, (floatv)(a), vloadv(dv, part_o + row * D) * b);
        }
    }
    vstorev(gated(o / L, gate, t, h, dv), dv, out + ((size_t)t * n_head + h) * D);
}

#endif  // D
