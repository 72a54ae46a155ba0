// matmul_q4_k_f32.cl - y (+)= x . W^T for a Q4_K weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 256 == 0.
// Q4_K: super-block of 256 = 8 sub-blocks of 32, w = d * sc_j * q - dmin * m_j, q 4-bit,
// sc_j / m_j 6-bit (ggml get_scale_min_k4); qs byte 32 c + l: column 64 c + l low, 64 c + 32 + l high.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_q4_k(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q4_K;
        __global const uchar *qs = tb + Q4_K_QS;
        const float16 d = half16_to_float16(LD_US16(tb, 0));
        const float16 dmin = half16_to_float16(LD_US16(tb + QK_DMIN, 0));
        _Pragma("unroll 1") for (int c = 0; c < 4; c++) {  // 64-column chunk: sub-blocks 2c (low) and 2c+1
            __global const float *xc = x + b * 256 + c * 64;
            MM_PREFETCH(tb + c * (TB_Q4_K / 4), TB_Q4_K / 4)  // a quarter per chunk: spread over the block
            MM_PART_DECL(slo)
            MM_PART_DECL(shi)
            const int U = MM_UNROLL(32, 4);
            _Pragma("unroll 1") for (int l = 0; l < 32; l += U) {
                _Pragma("unroll") for (int k = 0; k < U; k++) {
                    const int16 q = convert_int16(LD_UC16(qs, 32 * c + l + k));
                    MM_COL(slo, convert_float16(q & 15), xc + l + k, k % NA)
                    MM_COL(shi, convert_float16(q >> 4), xc + 32 + l + k, k % NA)
                }
            }
            float16 sc, m;
            scale_min_k4(2 * c, tb + QK_SCALES, &sc, &m);
            MM_BLOCK_END_MIN(slo, d * sc, -dmin * m, xc, 32)
            scale_min_k4(2 * c + 1, tb + QK_SCALES, &sc, &m);
            MM_BLOCK_END_MIN(shi, d * sc, -dmin * m, xc + 32, 32)
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q4_k_f32, tile_q4_k, 256, TB_Q4_K)
MM_KERNEL_ID(kernel_matmul_id_q4_k_f32, tile_q4_k, 256, TB_Q4_K)
