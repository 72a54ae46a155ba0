// matmul_iq4_xs_f32.cl - y (+)= x . W^T for an IQ4_XS weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 256 == 0.
// IQ4_XS: super-block of 256 = 8 sub-blocks of 32, w = d * (ls_j - 32) * IQ4_LEVELS[q], q a 4-bit index
// (qs byte 16 j + l: column 32 j + l low, 32 j + 16 + l high), ls_j 6-bit: the nibble j % 2 of
// scales_l[j / 2] below bits 2 j, 2 j + 1 of scales_h (ggml dequantize_row_iq4_xs).
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_iq4_xs(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_IQ4_XS;
        __global const uchar *qs = tb + IQ4_XS_QS;
        const float16 d = half16_to_float16(LD_US16(tb, 0));
        const int16 sh = convert_int16(LD_US16(tb + IQ4_XS_SH, 0));
        _Pragma("unroll 1") for (int j = 0; j < 8; j++) {  // sub-block of 32 columns
            __global const float *xj = x + b * 256 + j * 32;
            MM_PREFETCH(tb + j * (TB_IQ4_XS / 8), TB_IQ4_XS / 8)  // an eighth per sub-block: spread out
            MM_PART_DECL(s)
            const int U = MM_UNROLL(16, 2);
            _Pragma("unroll 1") for (int l = 0; l < 16; l += U) {
                _Pragma("unroll") for (int k = 0; k < U; k++) {
                    const uchar16 q = LD_UC16(qs, 16 * j + l + k);
                    MM_COL(s, iq4_levels(q), xj + l + k, (2 * k) % NA)
                    MM_COL(s, iq4_levels(q >> (uchar)4), xj + l + k + 16, (2 * k + 1) % NA)
                }
            }
            const int16 sl = convert_int16(LD_UC16(tb + IQ4_XS_SL, j >> 1));
            const int16 ls = ((sl >> (4 * (j & 1))) & 15) | (((sh >> (2 * j)) & 3) << 4);
            MM_BLOCK_END(s, d * convert_float16(ls - 32))
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_iq4_xs_f32, tile_iq4_xs, 256, TB_IQ4_XS)
MM_KERNEL_ID(kernel_matmul_id_iq4_xs_f32, tile_iq4_xs, 256, TB_IQ4_XS)
