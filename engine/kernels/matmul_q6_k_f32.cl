// matmul_q6_k_f32.cl - y (+)= x . W^T for a Q6_K weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 256 == 0.
// Q6_K: super-block of 256 = 16 sub-blocks of 16, w = d * sc_j * (q - 32), q 6-bit = 4 bits of
// ql and 2 of qh, sc_j int8 (ggml dequantize_row_q6_K).
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

// Column 128 n + 32 g + l (n: half, g: group 0..3, l: 0..31) is the low (g 0, 1) or high (g 2, 3) nibble of
// ql[64 n + l + 32 (g & 1)] with bits 2g, 2g+1 of qh[32 n + l] above it; sub-block (of 16) 8 n + 2 g + l / 16.

// One token: each (ql, ql + 32, qh) load feeds four columns, one per group, so four sub-blocks are summed
// at once (4 x 2 chains); fewer loads and zero-extensions per weight than a pass per group. Raw values
// 0..63 are summed and the -32 applied once per sub-block as -32 d sc sum(x): one horizontal sum of x per
// 16 columns costs less than a subtraction per column.
static __attribute__((always_inline)) inline void tile_q6_k_one(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q6_K;
        MM_PREFETCH(tb, TB_Q6_K)
        const float16 d = half16_to_float16(LD_US16(tb + Q6_K_D, 0));
        _Pragma("unroll 1") for (int n = 0; n < 2; n++) {
            __global const uchar *ql = tb + 64 * 16 * n;
            __global const uchar *qh = tb + Q6_K_QH + 32 * 16 * n;
            _Pragma("unroll 1") for (int hl = 0; hl < 2; hl++) {
                __global const float *xs = x + b * 256 + 128 * n + 16 * hl;
                MM_PART_DECL(s0)
                MM_PART_DECL(s1)
                MM_PART_DECL(s2)
                MM_PART_DECL(s3)
                _Pragma("unroll") for (int l = 0; l < 16; l++) {
                    const int16 a = convert_int16(LD_UC16(ql, 16 * hl + l));
                    const int16 c = convert_int16(LD_UC16(ql, 32 + 16 * hl + l));
                    const int16 h = convert_int16(LD_UC16(qh, 16 * hl + l));
                    MM_COL(s0, convert_float16((a & 15) | ((h << 4) & 48)), xs + l, l & 1)
                    MM_COL(s1, convert_float16((c & 15) | ((h << 2) & 48)), xs + 32 + l, l & 1)
                    MM_COL(s2, convert_float16((a >> 4) | (h & 48)), xs + 64 + l, l & 1)
                    MM_COL(s3, convert_float16((c >> 4) | ((h >> 2) & 48)), xs + 96 + l, l & 1)
                }
                __global const char *sc = (__global const char *)(tb + Q6_K_SC) + 16 * (8 * n + hl);
                float16 dsc = d * convert_float16(LD_C16(sc, 0));
                MM_BLOCK_END_MIN(s0, dsc, dsc * -32.0f, xs, 16)
                dsc = d * convert_float16(LD_C16(sc, 2));
                MM_BLOCK_END_MIN(s1, dsc, dsc * -32.0f, xs + 32, 16)
                dsc = d * convert_float16(LD_C16(sc, 4));
                MM_BLOCK_END_MIN(s2, dsc, dsc * -32.0f, xs + 64, 16)
                dsc = d * convert_float16(LD_C16(sc, 6));
                MM_BLOCK_END_MIN(s3, dsc, dsc * -32.0f, xs + 96, 16)
            }
        }
    }
    MM_STORE(y)
}

// Several tokens: one pass per group, so that only one sub-block's TT x NA sums are live. The -32 is
// subtracted per column here: a sum of x per token and sub-block would cost more than one integer op per
// column shared by all the tokens.
static __attribute__((always_inline)) inline void tile_q6_k_many(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q6_K;
        MM_PREFETCH(tb, TB_Q6_K)
        const float16 d = half16_to_float16(LD_US16(tb + Q6_K_D, 0));
        _Pragma("unroll 1") for (int n = 0; n < 2; n++) {
            __global const uchar *ql = tb + 64 * 16 * n;
            __global const uchar *qh = tb + Q6_K_QH + 32 * 16 * n;
            _Pragma("unroll 1") for (int g = 0; g < 4; g++) {
                const int lsh = 4 * (g >> 1), hsh = 2 * g;  // nibble and qh-bit shifts of this group
                _Pragma("unroll 1") for (int hl = 0; hl < 2; hl++) {  // sub-block of 16 columns
                    __global const float *xs = x + b * 256 + 128 * n + 32 * g + 16 * hl;
                    MM_PART_DECL(s)
                    _Pragma("unroll 1") for (int l = 0; l < 16; l += 4) {
                        _Pragma("unroll") for (int k = 0; k < 4; k++) {
                            const int16 a = convert_int16(LD_UC16(ql, 32 * (g & 1) + 16 * hl + l + k));
                            const int16 h = convert_int16(LD_UC16(qh, 16 * hl + l + k));
                            const int16 q = (((a >> lsh) & 15) | (((h >> hsh) & 3) << 4)) - 32;
                            MM_COL(s, convert_float16(q), xs + l + k, k % NA)
                        }
                    }
                    MM_BLOCK_END(s, d * convert_float16(LD_C16(tb + Q6_K_SC, 8 * n + 2 * g + hl)))
                }
            }
        }
    }
    MM_STORE(y)
}

static __attribute__((always_inline)) inline void tile_q6_k(const int TT, const int NA, MM_TILE_PARAMS) {
    if (MM_ONE_TOKEN(TT)) {
        tile_q6_k_one(TT, NA, wt, nb, x, n_cols, y, n_rows, rows, accumulate, xsum);
    } else {
        tile_q6_k_many(TT, NA, wt, nb, x, n_cols, y, n_rows, rows, accumulate, xsum);
    }
}

MM_KERNEL(kernel_matmul_q6_k_f32, tile_q6_k, 256, TB_Q6_K)
MM_KERNEL_ID(kernel_matmul_id_q6_k_f32, tile_q6_k, 256, TB_Q6_K)
