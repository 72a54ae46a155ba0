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

// The arithmetic of both paths (so that under MM_BATCH_INVARIANT a token's row has the same bits in any
// token group): a sub-block's values q - 32 times x are summed in NA chains (column c in chain c % NA, each
// chain in column order), the chains added in order, then times d sc (MM_BLOCK_END), sub-block after
// sub-block in the order (half n, group g, 16 columns hl).

// One token: each (ql, ql + 32, qh) load feeds four columns, one per group, so the eight sub-blocks of a
// half are summed at once (8 x NA independent chains hide the FMA latency) with fewer loads and
// zero-extensions per weight than a pass per group; then their block ends, in the order above. A pass per
// sub-block, as for several tokens, decoded a Q6_K model at 43 tok/s, this at 60 (bench qwen3, 2 cores).
static __attribute__((always_inline)) inline void tile_q6_k_one(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q6_K;
        MM_PREFETCH(tb, TB_Q6_K)
        const float16 d = half16_to_float16(LD_US16(tb + Q6_K_D, 0));
        _Pragma("unroll 1") for (int n = 0; n < 2; n++) {
            __global const uchar *ql = tb + 64 * 16 * n;
            __global const uchar *qh = tb + Q6_K_QH + 32 * 16 * n;
            __global const float *xn = x + b * 256 + 128 * n;
            MM_PARTS_DECL(s, 4)  // s[hl][g]: columns 16 hl .. 16 hl + 15 of group g
            _Pragma("unroll") for (int hl = 0; hl < 2; hl++) {
                _Pragma("unroll") for (int l = 0; l < 16; l++) {
                    const int16 a = convert_int16(LD_UC16(ql, 16 * hl + l));
                    const int16 c = convert_int16(LD_UC16(ql, 32 + 16 * hl + l));
                    const int16 h = convert_int16(LD_UC16(qh, 16 * hl + l));
                    __global const float *xl = xn + 16 * hl + l;
                    MM_COL(s[hl][0], convert_float16(((a & 15) | ((h << 4) & 48)) - 32), xl, l % NA)
                    MM_COL(s[hl][1], convert_float16(((c & 15) | ((h << 2) & 48)) - 32), xl + 32, l % NA)
                    MM_COL(s[hl][2], convert_float16(((a >> 4) | (h & 48)) - 32), xl + 64, l % NA)
                    MM_COL(s[hl][3], convert_float16(((c >> 4) | ((h >> 2) & 48)) - 32), xl + 96, l % NA)
                }
            }
            __global const char *sc = (__global const char *)(tb + Q6_K_SC) + 16 * 8 * n;
            _Pragma("unroll") for (int g = 0; g < 4; g++) {
                float16 dsc = d * convert_float16(LD_C16(sc, 2 * g));
                MM_BLOCK_END(s[0][g], dsc)
                dsc = d * convert_float16(LD_C16(sc, 2 * g + 1));
                MM_BLOCK_END(s[1][g], dsc)
            }
        }
    }
    MM_STORE(y)
}

// Several tokens: one pass per sub-block, so that only its TT x NA sums are live.
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
                            MM_COL(s, convert_float16(q), xs + l + k, (l + k) % NA)
                        }
                    }
                    const float16 dsc = d * convert_float16(LD_C16(tb + Q6_K_SC, 8 * n + 2 * g + hl));
                    MM_BLOCK_END(s, dsc)
                }
            }
        }
    }
    MM_STORE(y)
}

static __attribute__((always_inline)) inline void tile_q6_k(const int TT, const int NA, MM_TILE_PARAMS) {
    if (TT == 1) {
        tile_q6_k_one(TT, NA, wt, nb, x, n_cols, y, n_rows, rows, accumulate, xsum);
    } else {
        tile_q6_k_many(TT, NA, wt, nb, x, n_cols, y, n_rows, rows, accumulate, xsum);
    }
}

MM_KERNEL(kernel_matmul_q6_k_f32, tile_q6_k, 256, TB_Q6_K)
MM_KERNEL_ID(kernel_matmul_id_q6_k_f32, tile_q6_k, 256, TB_Q6_K)
