// matmul_q3_k_f32.cl - y (+)= x . W^T for a Q3_K weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); n_cols % 256 == 0.
// Q3_K: super-block of 256 = 16 sub-blocks of 16, w = d * sc_j * (q - 4), q 3-bit = 2 bits of qs and one
// of hmask, sc_j signed 6-bit (q3_k_scale in quants.h; ggml dequantize_row_q3_K).
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

// Column 128 n + 32 g + l (n: half, g: group 0..3, l: 0..31) is bits 2g, 2g+1 of qs[32 n + l] below bit
// 4 n + g of hmask[l] (ggml: q - 4 where that bit is clear, q where it is set); sub-block 8 n + 2 g + l / 16.
//
// One token: each (qs, hmask) load feeds one column of each of the four groups (the eight sub-blocks of a
// half summed at once, as Q6_K's one-token tile); several tokens: one group per pass, so that only its two
// sub-blocks' TT x NA sums are live. Either way the block ends follow in column order, and the 4 is
// subtracted per column (one integer op shared by the tokens), except in the one-token shortcut without
// batch invariance (MM_ONE_TOKEN: raw 0..7 summed in 2 chains, the -4 applied once per sub-block as
// -4 d sc sum(x)).
static __attribute__((always_inline)) inline void tile_q3_k(const int TT, const int NA, MM_TILE_PARAMS) {
    const int G = TT == 1 ? 4 : 1;                // groups per pass
    const int NC = MM_ONE_TOKEN(TT) ? 2 : NA;     // chains per sub-block
    const int off = MM_ONE_TOKEN(TT) ? 0 : 4;
    const int U = MM_UNROLL(16, 4);
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q3_K;
        MM_PREFETCH(tb, TB_Q3_K)
        const float16 d = half16_to_float16(LD_US16(tb + Q3_K_D, 0));
        _Pragma("unroll 1") for (int n = 0; n < 2; n++) {
            __global const uchar *qs = tb + Q3_K_QS + 32 * 16 * n;
            _Pragma("unroll 1") for (int g0 = 0; g0 < 4; g0 += G) {
                __global const float *xg = x + b * 256 + 128 * n + 32 * g0;
                MM_PARTS_DECL(s, G)  // s[hl][g]: columns 16 hl .. 16 hl + 15 of group g0 + g
                _Pragma("unroll") for (int hl = 0; hl < 2; hl++) {
                    _Pragma("unroll 1") for (int l = 0; l < 16; l += U) {
                        _Pragma("unroll") for (int k = 0; k < U; k++) {
                            const int16 a = convert_int16(LD_UC16(qs, 16 * hl + l + k)) >> (2 * g0);
                            const int16 h = convert_int16(LD_UC16(tb, 16 * hl + l + k)) >> (4 * n + g0);
                            _Pragma("unroll") for (int g = 0; g < G; g++) {
                                const int16 q = (((a >> (2 * g)) & 3) | (((h >> g) & 1) << 2)) - off;
                                __global const float *xp = xg + 32 * g + 16 * hl + l + k;
                                MM_COL(s[hl][g], convert_float16(q), xp, (l + k) % NC)
                            }
                        }
                    }
                }
                _Pragma("unroll") for (int g = 0; g < G; g++) {  // sub-block after sub-block, in column order
                    const float16 dlo = d * q3_k_scale(tb + Q3_K_SC, 8 * n + 2 * (g0 + g));
                    const float16 dhi = d * q3_k_scale(tb + Q3_K_SC, 8 * n + 2 * (g0 + g) + 1);
                    if (MM_ONE_TOKEN(TT)) {
                        MM_BLOCK_END_MIN(s[0][g], dlo, dlo * -4.0f, xg + 32 * g, 16)
                        MM_BLOCK_END_MIN(s[1][g], dhi, dhi * -4.0f, xg + 32 * g + 16, 16)
                    } else {
                        MM_BLOCK_END(s[0][g], dlo)
                        MM_BLOCK_END(s[1][g], dhi)
                    }
                }
            }
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q3_k_f32, tile_q3_k, 256, TB_Q3_K)
MM_KERNEL_ID(kernel_matmul_id_q3_k_f32, tile_q3_k, 256, TB_Q3_K)
