// matmul_q8_0_f32.cl - y (+)= x . W^T for a Q8_0 weight in the tile layout of quants.h.
//
// Computes y[t, r] (+)= sum_c dequant(W)[r, c] * x[t, c] for t < n_tokens, r < n_rows; x float32
// [n_tokens, n_cols], y float32 [n_tokens, n_rows]; n_cols % 32 == 0. Q8_0: w = d * q, q int8, one half
// scale d per 32 columns. accumulate != 0 adds into y (the residual add after attn_output / ffn_down).
//
// NDRange: 2-D (tile, token chunk): global = (ceil(n_rows / 16) rounded up to the local size,
//     ceil(max_tokens / tchunk)), local = (WG, 1). Work-item (i, j) owns rows [16 i, 16 i + 16), lane l of
//     its float16 accumulators being row 16 i + l, and tokens [j tchunk, (j + 1) tchunk) up to n_tokens
//     (a step argument; chunks past it return at once). It decodes each column of its tile once per group
//     of up to 8 tokens and does rank-1 updates with x broadcast from memory (see MM_KERNEL in quants.h).
// Variants (host side, engine/ops/matmul.py): mat-vec (max_tokens 1, tchunk 1), few tokens (tchunk =
//     max_tokens <= 16: the weight is streamed from memory once, later token groups hit the cache) and
//     prompt (tchunk 64, so that a chunk of x stays in the CPU's L2 while the tile is re-read from L1).
//     All run the same arithmetic per (row, token): results agree to float rounding.
// Reference: tests/test_matmul.py::reference (gguf.quants.dequantize(raw) then x @ W.T, float64).

#include "quants.h"

__attribute__((always_inline)) inline void tile_q8_0(const int TT, const int NA, MM_TILE_PARAMS) {
    MM_ACC_DECL
    for (int b = 0; b < nb; b++) {
        __global const uchar *tb = wt + (size_t)b * TB_Q8_0;
        const float16 d = half16_to_float16(vload16(0, (__global const ushort *)tb));
        __global const char *qs = (__global const char *)(tb + Q8_0_QS);
        __global const float *xb = x + b * 32;
        // 4 columns per iteration: fully unrolling the block lets the compiler decode all 32 columns
        // first and spill them
        _Pragma("unroll 1") for (int c = 0; c < 32; c += 4) {
            _Pragma("unroll") for (int j = 0; j < 4; j++) {
                const float16 wc = convert_float16(vload16(c + j, qs)) * d;
                MM_COL(wc, xb + c + j, j % NA)
            }
        }
    }
    MM_STORE(y)
}

MM_KERNEL(kernel_matmul_q8_0_f32, tile_q8_0, 32, TB_Q8_0)
