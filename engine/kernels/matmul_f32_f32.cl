// matmul_f32_f32.cl - y (+)= x . W^T for a F32 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 rows of ldy floats from y_off (not aliasing x); any n_cols.
// F32: tile block = one column of 16 floats.
// accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange, work-group contract and variants: the MM_KERNEL contract in quants.h.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw), then x @ W.T in float64).

#include "quants.h"

static __attribute__((always_inline)) inline void tile_f32(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    MM_PART_DECL(s)
    // a "block" is one column here (nb = n_cols): no scales, the sums run over the whole row
    const int U = MM_UNROLL(16, 4);
    const int n_main = nb - nb % U;
    _Pragma("unroll 1") for (int c = 0; c < n_main; c += U) {
        MM_PREFETCH(wt + (size_t)c * TB_F32, U * TB_F32)
        _Pragma("unroll") for (int j = 0; j < U; j++) {
            MM_COL(s, LD_F16(wt, c + j), x + c + j, j % NA)
        }
    }
    for (int c = n_main; c < nb; c++) {
        MM_COL(s, LD_F16(wt, c), x + c, c % NA)
    }
    MM_BLOCK_END(s, (float16)(1.0f))
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_f32_f32, tile_f32, 1, TB_F32)
MM_KERNEL_ID(kernel_matmul_id_f32_f32, tile_f32, 1, TB_F32)
