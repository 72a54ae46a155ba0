// get_rows.cl - embedding lookup: y[t, :] = dequant(W[ids[t], :]) as float32, W in the tile layout of quants.h.
//
// ids int32 [n_tokens]; y float32 [n_tokens, n_cols]. An id outside [0, n_rows) yields a row of zeros (a
// bad token id must not read outside the weight buffer).
//
// NDRange: 2-D (piece of the row, token): global = (ceil(n_pieces / WG) * WG, n_tokens), local = (WG, 1).
//     A piece is one GGUF block (32 columns for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / IQ4_NL, 256 for the
//     K-quants and IQ4_XS) or, for F32 / F16 / BF16, 16 columns (the last one possibly shorter). Row r
//     lives in lane r % 16 of tile r / 16, so a work-item reads every 16th byte of its tile block: a lookup
//     touches a few rows per token and is not worth a layout of its own. Tokens >= n_tokens (the grid has
//     at least one) return at once.
// Variants: one entry point per weight type, kernel_get_rows_<type>.
// Dequantization follows ggml-quants.c (dequantize_row_*), in float32.
// Reference: tests/test_matmul.py::test_get_rows (gguf.quants.dequantize(raw)[ids]).

#include "quants.h"

// Shared prologue: row, lane, the tile block of piece i (nb pieces of TB bytes per tile), the output.
#define GR_PROLOGUE(TB, PIECE_COLS)                                                                         \
    const int i = get_global_id(0);                                                                         \
    const int t = get_global_id(1);                                                                         \
    if (t >= n_tokens || i * (PIECE_COLS) >= n_cols) {                                                      \
        return;                                                                                             \
    }                                                                                                       \
    const int row = ids[t];                                                                                 \
    __global float *yr = y + (size_t)t * n_cols + (size_t)i * (PIECE_COLS);                                 \
    const int ncols_here = min((PIECE_COLS), n_cols - i * (PIECE_COLS));                                    \
    if (row < 0 || row >= n_rows) {                                                                         \
        for (int c = 0; c < ncols_here; c++) {                                                              \
            yr[c] = 0.0f;                                                                                   \
        }                                                                                                   \
        return;                                                                                             \
    }                                                                                                       \
    const int lane = row % TILE_ROWS;                                                                       \
    const int nb = n_cols / (PIECE_COLS);                                                                   \
    __global const uchar *tb = w + ((size_t)(row / TILE_ROWS) * nb + i) * (TB);

#define GR_PARAMS                                                                                           \
    __global const uchar *w, __global const int *ids, __global float *y, const int n_rows, const int n_cols, \
        const int n_tokens

// element k of a field of bytes starting at off, for this lane
#define B8(off, k) tb[(off) + (k) * TILE_ROWS + lane]
#define H16(off) half_to_float(((__global const ushort *)(tb + (off)))[lane])

__kernel void kernel_get_rows_q8_0(GR_PARAMS) {
    GR_PROLOGUE(TB_Q8_0, 32)
    const float d = H16(0);
    for (int c = 0; c < 32; c++) {
        yr[c] = d * (float)(char)B8(Q8_0_QS, c);
    }
}

__kernel void kernel_get_rows_q4_0(GR_PARAMS) {
    GR_PROLOGUE(TB_Q4_0, 32)
    const float d = H16(0);
    for (int j = 0; j < 16; j++) {
        const int q = B8(Q4_0_QS, j);
        yr[j] = d * (float)((q & 15) - 8);
        yr[j + 16] = d * (float)((q >> 4) - 8);
    }
}

__kernel void kernel_get_rows_q4_1(GR_PARAMS) {
    GR_PROLOGUE(TB_Q4_1, 32)
    const float d = H16(0), m = H16(Q4_1_M);
    for (int j = 0; j < 16; j++) {
        const int q = B8(Q4_1_QS, j);
        yr[j] = d * (float)(q & 15) + m;
        yr[j + 16] = d * (float)(q >> 4) + m;
    }
}

// Q5_0 / Q5_1: q (0..31) of column j, the fifth bit from the row's 32-bit qh (ggml's little-endian uint32)
inline void get_rows_q5(__global const uchar *tb, const int lane, __global float *yr, const int qh_off,
                        const int qs_off, const float d, const float m) {
    const uint h = B8(qh_off, 0) | (B8(qh_off, 1) << 8) | (B8(qh_off, 2) << 16) | ((uint)B8(qh_off, 3) << 24);
    for (int j = 0; j < 16; j++) {
        const int q = B8(qs_off, j);
        yr[j] = d * (float)((q & 15) | (((h >> j) & 1) << 4)) + m;
        yr[j + 16] = d * (float)((q >> 4) | (((h >> (j + 16)) & 1) << 4)) + m;
    }
}

__kernel void kernel_get_rows_q5_0(GR_PARAMS) {
    GR_PROLOGUE(TB_Q5_0, 32)
    const float d = H16(0);
    get_rows_q5(tb, lane, yr, Q5_0_QH, Q5_0_QS, d, -16.0f * d);  // d (q - 16)
}

__kernel void kernel_get_rows_q5_1(GR_PARAMS) {
    GR_PROLOGUE(TB_Q5_1, 32)
    get_rows_q5(tb, lane, yr, Q5_1_QH, Q5_1_QS, H16(0), H16(Q5_1_M));
}

__constant float iq4_levels_lut[16] = {IQ4_LEVELS};

// 32 columns of IQ4_NL / IQ4_XS: qs byte j holds the level indices of column j (low) and j + 16 (high)
inline void get_rows_iq4(__global const uchar *tb, const int lane, __global float *yr, const int qs_off,
                         const float d) {
    for (int j = 0; j < 16; j++) {
        const int q = B8(qs_off, j);
        yr[j] = d * iq4_levels_lut[q & 15];
        yr[j + 16] = d * iq4_levels_lut[q >> 4];
    }
}

__kernel void kernel_get_rows_iq4_nl(GR_PARAMS) {
    GR_PROLOGUE(TB_IQ4_NL, 32)
    get_rows_iq4(tb, lane, yr, IQ4_NL_QS, H16(0));
}

__kernel void kernel_get_rows_iq4_xs(GR_PARAMS) {
    GR_PROLOGUE(TB_IQ4_XS, 256)
    const float d = H16(0);
    const int sh = ((__global const ushort *)(tb + IQ4_XS_SH))[lane];
    for (int j = 0; j < 8; j++) {
        const int ls = ((B8(IQ4_XS_SL, j >> 1) >> (4 * (j & 1))) & 15) | (((sh >> (2 * j)) & 3) << 4);
        get_rows_iq4(tb, lane, yr + 32 * j, IQ4_XS_QS + 16 * j * TILE_ROWS, d * (float)(ls - 32));
    }
}

// sub-block j's 6-bit scale and min from the 12 packed bytes (ggml get_scale_min_k4), for this lane
inline void scale_min_k4_lane(const int j, __global const uchar *tb, const int lane, float *sc, float *m) {
    const int o = QK_SCALES;
    if (j < 4) {
        *sc = (float)(B8(o, j) & 63);
        *m = (float)(B8(o, j + 4) & 63);
    } else {
        *sc = (float)((B8(o, j + 4) & 0xF) | ((B8(o, j - 4) >> 6) << 4));
        *m = (float)((B8(o, j + 4) >> 4) | ((B8(o, j) >> 6) << 4));
    }
}

// Q4_K (qh_off < 0) and Q5_K share everything but the fifth bit.
inline void get_rows_qk(__global const uchar *tb, const int lane, __global float *yr, const int qs_off,
                        const int qh_off) {
    const float d = H16(0);
    const float dmin = H16(QK_DMIN);
    for (int c = 0; c < 4; c++) {
        float sc0, m0, sc1, m1;
        scale_min_k4_lane(2 * c, tb, lane, &sc0, &m0);
        scale_min_k4_lane(2 * c + 1, tb, lane, &sc1, &m1);
        const float d0 = d * sc0, d1 = d * sc1, n0 = dmin * m0, n1 = dmin * m1;
        for (int l = 0; l < 32; l++) {
            const int q = B8(qs_off, 32 * c + l);
            int lo = q & 15, hi = q >> 4;
            if (qh_off >= 0) {
                const int h = B8(qh_off, l);
                lo |= ((h >> (2 * c)) & 1) << 4;
                hi |= ((h >> (2 * c + 1)) & 1) << 4;
            }
            yr[64 * c + l] = d0 * (float)lo - n0;
            yr[64 * c + 32 + l] = d1 * (float)hi - n1;
        }
    }
}

__kernel void kernel_get_rows_q4_k(GR_PARAMS) {
    GR_PROLOGUE(TB_Q4_K, 256)
    get_rows_qk(tb, lane, yr, Q4_K_QS, -1);
}

__kernel void kernel_get_rows_q5_k(GR_PARAMS) {
    GR_PROLOGUE(TB_Q5_K, 256)
    get_rows_qk(tb, lane, yr, Q5_K_QS, Q5_K_QH);
}

// Q2_K (hm_off < 0) and Q3_K: column 128 n + 32 g + l is bits 2g, 2g+1 of qs[32 n + l], for Q3_K with bit
// 4 n + g of hmask[l] clear meaning -4; sub-block 8 n + 2 g + l / 16 (scale dl[j], offset ml[j]).
inline void get_rows_k2(__global const uchar *tb, const int lane, __global float *yr, const int qs_off,
                        const int hm_off, const float *dl, const float *ml) {
    for (int n = 0; n < 2; n++) {
        for (int l = 0; l < 32; l++) {
            const int a = B8(qs_off, 32 * n + l);
            const int h = hm_off >= 0 ? B8(hm_off, l) >> (4 * n) : 15;
            for (int g = 0; g < 4; g++) {
                const int j = 8 * n + 2 * g + l / 16;
                const int q = ((a >> (2 * g)) & 3) - (((h >> g) & 1) ? 0 : 4);
                yr[128 * n + 32 * g + l] = dl[j] * (float)q - ml[j];
            }
        }
    }
}

__kernel void kernel_get_rows_q2_k(GR_PARAMS) {
    GR_PROLOGUE(TB_Q2_K, 256)
    const float d = H16(Q2_K_D), dmin = H16(Q2_K_DMIN);
    float dl[16], ml[16];
    for (int j = 0; j < 16; j++) {
        dl[j] = d * (float)(B8(0, j) & 15);
        ml[j] = dmin * (float)(B8(0, j) >> 4);
    }
    get_rows_k2(tb, lane, yr, Q2_K_QS, -1, dl, ml);
}

__kernel void kernel_get_rows_q3_k(GR_PARAMS) {
    GR_PROLOGUE(TB_Q3_K, 256)
    const float d = H16(Q3_K_D);
    float dl[16], ml[16];
    for (int j = 0; j < 16; j++) {
        const int lo = (B8(Q3_K_SC, j & 7) >> (4 * (j >> 3))) & 15;
        const int hi = (B8(Q3_K_SC, 8 + (j & 3)) >> (2 * (j >> 2))) & 3;
        dl[j] = d * (float)((lo | (hi << 4)) - 32);
        ml[j] = 0.0f;
    }
    get_rows_k2(tb, lane, yr, Q3_K_QS, 0, dl, ml);
}

__kernel void kernel_get_rows_q6_k(GR_PARAMS) {
    GR_PROLOGUE(TB_Q6_K, 256)
    const float d = H16(Q6_K_D);
    for (int n = 0; n < 2; n++) {
        for (int l = 0; l < 32; l++) {
            const int a = B8(0, 64 * n + l);
            const int b = B8(0, 64 * n + l + 32);
            const int h = B8(Q6_K_QH, 32 * n + l);
            const int is = 8 * n + l / 16;
            yr[128 * n + l] = d * (float)(char)B8(Q6_K_SC, is) * (float)(((a & 15) | ((h & 3) << 4)) - 32);
            yr[128 * n + l + 32] = d * (float)(char)B8(Q6_K_SC, is + 2) * (float)(((b & 15) | (((h >> 2) & 3) << 4)) - 32);
            yr[128 * n + l + 64] = d * (float)(char)B8(Q6_K_SC, is + 4) * (float)(((a >> 4) | (((h >> 4) & 3) << 4)) - 32);
            yr[128 * n + l + 96] = d * (float)(char)B8(Q6_K_SC, is + 6) * (float)(((b >> 4) | (((h >> 6) & 3) << 4)) - 32);
        }
    }
}

// Float types: a piece is 16 columns; column c's tile block (16 rows) is TB bytes at w + (tile * n_cols + c) * TB.
#define GR_FLOAT_PROLOGUE(TB)                                                                               \
    const int i = get_global_id(0);                                                                         \
    const int t = get_global_id(1);                                                                         \
    if (t >= n_tokens || i * 16 >= n_cols) {                                                                \
        return;                                                                                             \
    }                                                                                                       \
    const int row = ids[t];                                                                                 \
    const int c0 = i * 16;                                                                                  \
    const int c1 = min(n_cols, c0 + 16);                                                                    \
    __global float *yr = y + (size_t)t * n_cols;                                                            \
    if (row < 0 || row >= n_rows) {                                                                         \
        for (int c = c0; c < c1; c++) {                                                                     \
            yr[c] = 0.0f;                                                                                   \
        }                                                                                                   \
        return;                                                                                             \
    }                                                                                                       \
    const int lane = row % TILE_ROWS;                                                                       \
    __global const uchar *wt = w + (size_t)(row / TILE_ROWS) * n_cols * (TB);

__kernel void kernel_get_rows_f32(GR_PARAMS) {
    GR_FLOAT_PROLOGUE(TB_F32)
    for (int c = c0; c < c1; c++) {
        yr[c] = ((__global const float *)(wt + (size_t)c * TB_F32))[lane];
    }
}

__kernel void kernel_get_rows_f16(GR_PARAMS) {
    GR_FLOAT_PROLOGUE(TB_F16)
    for (int c = c0; c < c1; c++) {
        yr[c] = half_to_float(((__global const ushort *)(wt + (size_t)c * TB_F16))[lane]);
    }
}

__kernel void kernel_get_rows_bf16(GR_PARAMS) {
    GR_FLOAT_PROLOGUE(TB_BF16)
    for (int c = c0; c < c1; c++) {
        yr[c] = as_float((uint)((__global const ushort *)(wt + (size_t)c * TB_BF16))[lane] << 16);
    }
}
