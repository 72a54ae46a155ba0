// matvec_q8_0_f32_gpu.cl - y (+)= x . W^T for ONE token and a Q8_0 weight in the tile layout of quants.h,
// shaped for GPUs (the MM_KERNEL driver is shaped for a CPU: one work-item streams a whole 16-row tile, so
// a 1024-row weight is 64 work-items, one work-group, one SM of an H100).
//
// Same arguments as kernel_matmul_q8_0_f32 (so the host sets them the same way; tchunk is unused) and the
// same result for n_tokens == 1 up to the order of the float sums; n_tokens == 0 does nothing.
// NDRange: 2-D, global = (n_tiles * MV_WG, 1), local = (MV_WG, 1), MV_WG = 32 * MV_WARPS (host -D).
// Work-group g owns tile g (rows [16 g, 16 g + 16)). Lane j of a 32-wide warp loads element j of the
// tile block's qs field - 16 bytes, column j of the 16 rows - so one warp-wide load reads the block's
// 512 quant bytes contiguously (coalesced), and the warps of the group take every MV_WARPS-th block.
// Each work-item keeps the 16 row sums in a float16; the group adds them up in local memory.
#include "quants.h"

#ifndef MV_WARPS
#define MV_WARPS 4
#endif
#define MV_WG (32 * MV_WARPS)

__kernel __attribute__((reqd_work_group_size(MV_WG, 1, 1)))
void kernel_matvec_q8_0_f32_gpu(__global const uchar *w, __global const float *x, __global float *y,
                                const int n_rows, const int n_cols, const int n_tokens, const int tchunk,
                                const int accumulate, const int ldy, const int y_off) {
    __local float red[TILE_ROWS * MV_WG];
    if (n_tokens <= 0) {
        return;  // uniform over the group: no work-item reaches the barriers
    }
    const int tile = get_group_id(0);
    const int lid = get_local_id(0);
    const int lane = lid & 31;
    const int nb = n_cols / 32;
    __global const uchar *wt = w + (size_t)tile * nb * TB_Q8_0;
    float16 acc = (float16)(0.0f);
    #pragma unroll 4
    for (int b = lid >> 5; b < nb; b += MV_WARPS) {
        __global const uchar *tb = wt + (size_t)b * TB_Q8_0;
        const float16 q = convert_float16(LD_C16(tb + Q8_0_QS, lane));
        acc = fma(q * x[b * 32 + lane], half16_to_float16(LD_US16(tb, 0)), acc);
    }
    vstore16(acc, lid, red);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = MV_WG / 2; s > 0; s >>= 1) {
        if (lid < s) {
            vstore16(vload16(lid, red) + vload16(lid + s, red), lid, red);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int r = tile * TILE_ROWS + lid;
    if (lid < TILE_ROWS && r < n_rows) {
        __global float *yr = y + y_off + r;
        *yr = accumulate ? *yr + red[lid] : red[lid];
    }
}
