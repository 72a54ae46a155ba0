// matmul_iq4_nl_f32.cl - y (+)= x . W^T for an IQ4_NL weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 32 == 0.
// IQ4_NL: w = d * IQ4_LEVELS[q] per block of 32 columns, q a 4-bit index (byte j: column j low, j + 16
// high), d half.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_iq4_nl(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_IQ4_NL;
        MM_PREFETCH(tb, TB_IQ4_NL)
        __global const uchar *qs = tb + IQ4_NL_QS;
        __global const float *xb = x + b * 32;
        MM_PART_DECL(s)
        const int U = MM_UNROLL(16, 2);
        _Pragma("unroll 1") for (int j = 0; j < 16; j += U) {
            _Pragma("unroll") for (int k = 0; k < U; k++) {
                const uchar16 q = LD_UC16(qs, j + k);
                MM_COL(s, iq4_levels(q), xb + j + k, (2 * k) % NA)
                MM_COL(s, iq4_levels(q >> (uchar)4), xb + j + k + 16, (2 * k + 1) % NA)
            }
        }
        MM_BLOCK_END(s, half16_to_float16(LD_US16(tb, 0)))
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_iq4_nl_f32, tile_iq4_nl, 32, TB_IQ4_NL)
MM_KERNEL_ID(kernel_matmul_id_iq4_nl_f32, tile_iq4_nl, 32, TB_IQ4_NL)
