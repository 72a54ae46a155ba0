// matmul_q8_0_f32.cl - y (+)= x . W^T for a Q8_0 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 32 == 0.
// Q8_0: w = d * q per block of 32 columns, q int8, d half.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_q8_0(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    const int U = MM_UNROLL(32, 4);
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q8_0;
        MM_PREFETCH(tb, TB_Q8_0)
        __global const uchar *qs = tb + Q8_0_QS;
        __global const float *xb = x + b * 32;
        MM_PART_DECL(s)
        _Pragma("unroll 1") for (int c = 0; c < 32; c += U) {
            _Pragma("unroll") for (int j = 0; j < U; j++) {
                MM_COL(s, convert_float16(LD_C16(qs, c + j)), xb + c + j, j % NA)
            }
        }
        MM_BLOCK_END(s, half16_to_float16(LD_US16(tb, 0)))
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q8_0_f32, tile_q8_0, 32, TB_Q8_0)
MM_KERNEL_ID(kernel_matmul_id_q8_0_f32, tile_q8_0, 32, TB_Q8_0)
