// matmul_q5_0_f32.cl - y (+)= x . W^T for a Q5_0 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 32 == 0.
// Q5_0: w = d * (q - 16) per block of 32 columns, q 5-bit: the nibbles as Q4_0 (byte j: column j low,
// j + 16 high), the fifth bit of column c bit c of the 32-bit qh.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_q5_0(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q5_0;
        MM_PREFETCH(tb, TB_Q5_0)
        __global const uchar *qs = tb + Q5_0_QS;
        __global const float *xb = x + b * 32;
        const uint16 h = q5_qh(tb + Q5_0_QH);
        MM_PART_DECL(s)
        const int U = MM_UNROLL(16, 2);
        // the -16 as Q4_0's -8: once per block for one token, per column (shared by the tokens) for several
        const int off = MM_ONE_TOKEN(TT) ? 0 : 16;
        _Pragma("unroll 1") for (int j = 0; j < 16; j += U) {
            _Pragma("unroll") for (int k = 0; k < U; k++) {
                const int16 q = convert_int16(LD_UC16(qs, j + k));
                const int16 lo = ((q & 15) | Q5_BIT(h, j + k)) - off;
                const int16 hi = ((q >> 4) | Q5_BIT(h, j + k + 16)) - off;
                MM_COL(s, convert_float16(lo), xb + j + k, (2 * k) % NA)
                MM_COL(s, convert_float16(hi), xb + j + k + 16, (2 * k + 1) % NA)
            }
        }
        const float16 d = half16_to_float16(LD_US16(tb, 0));
        if (MM_ONE_TOKEN(TT)) {
            MM_BLOCK_END_MIN(s, d, d * -16.0f, xb, 32)
        } else {
            MM_BLOCK_END(s, d)
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q5_0_f32, tile_q5_0, 32, TB_Q5_0)
MM_KERNEL_ID(kernel_matmul_id_q5_0_f32, tile_q5_0, 32, TB_Q5_0)
