// matmul_q4_0_f32.cl - y (+)= x . W^T for a Q4_0 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 32 == 0.
// Q4_0: w = d * (q - 8) per block of 32 columns, q 4-bit (byte j: column j low, j + 16 high).
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_q4_0(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q4_0;
        MM_PREFETCH(tb, TB_Q4_0)
        __global const uchar *qs = tb + Q4_0_QS;
        __global const float *xb = x + b * 32;
        MM_PART_DECL(s)
        const int U = MM_UNROLL(16, 2);
        // one token: raw nibbles 0..15 are summed and the -8 applied once per block as -8 d sum(x); several
        // tokens: 8 is subtracted per column, one integer op shared by all the tokens instead of a
        // horizontal sum of x per token
        const int off = MM_ONE_TOKEN(TT) ? 0 : 8;
        _Pragma("unroll 1") for (int j = 0; j < 16; j += U) {
            _Pragma("unroll") for (int k = 0; k < U; k++) {
                const int16 q = convert_int16(LD_UC16(qs, j + k));
                MM_COL(s, convert_float16((q & 15) - off), xb + j + k, (2 * k) % NA)
                MM_COL(s, convert_float16((q >> 4) - off), xb + j + k + 16, (2 * k + 1) % NA)
            }
        }
        const float16 d = half16_to_float16(LD_US16(tb, 0));
        if (MM_ONE_TOKEN(TT)) {
            MM_BLOCK_END_MIN(s, d, d * -8.0f, xb, 32)
        } else {
            MM_BLOCK_END(s, d)
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q4_0_f32, tile_q4_0, 32, TB_Q4_0)
MM_KERNEL_ID(kernel_matmul_id_q4_0_f32, tile_q4_0, 32, TB_Q4_0)
