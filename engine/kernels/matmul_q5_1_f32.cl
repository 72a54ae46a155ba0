// matmul_q5_1_f32.cl - y (+)= x . W^T for a Q5_1 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 32 == 0.
// Q5_1: w = d * q + m per block of 32 columns, q 5-bit as Q5_0's, d, m half.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_q5_1(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q5_1;
        MM_PREFETCH(tb, TB_Q5_1)
        __global const uchar *qs = tb + Q5_1_QS;
        __global const float *xb = x + b * 32;
        const uint16 h = q5_qh(tb + Q5_1_QH);
        const float16 d = half16_to_float16(LD_US16(tb, 0));
        const float16 m = half16_to_float16(LD_US16(tb + Q5_1_M, 0));
        MM_PART_DECL(s)
        const int U = MM_UNROLL(16, 2);
        _Pragma("unroll 1") for (int j = 0; j < 16; j += U) {
            _Pragma("unroll") for (int k = 0; k < U; k++) {
                const int16 q = convert_int16(LD_UC16(qs, j + k));
                const int16 lo = (q & 15) | Q5_BIT(h, j + k);
                const int16 hi = (q >> 4) | Q5_BIT(h, j + k + 16);
                MM_COL(s, Q_1_WEIGHT(lo, d, m), xb + j + k, (2 * k) % NA)
                MM_COL(s, Q_1_WEIGHT(hi, d, m), xb + j + k + 16, (2 * k + 1) % NA)
            }
        }
        Q_1_BLOCK_END(s, d, m, xb)
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q5_1_f32, tile_q5_1, 32, TB_Q5_1)
MM_KERNEL_ID(kernel_matmul_id_q5_1_f32, tile_q5_1, 32, TB_Q5_1)
