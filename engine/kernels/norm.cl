// norm.cl - RMS normalisation of rows, optionally times a per-column weight.
//
// Computes, for each row r < n_rows:
//     y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]
// Rows are contiguous, `row_len` floats each; y may alias x (in place: every element is read in the
// first pass, before any is written in the second). One launch covers the model's token norms
// (row_len = n_embd, one row per token) and qwen3's per-head q/k norms (row_len = head_dim, n_head rows
// per token).
//
// NDRange: 1-D, one work-group of WG work-items per row: global = n_rows * WG, local = WG.
//     Work-item i sums squares of float4 chunks i, i+WG, ... of its row (strided so that neighbouring
//     work-items read neighbouring addresses on a GPU), a local-memory tree reduces the WG partial sums,
//     then each work-item scales the same chunks. A scalar tail covers row_len % 4.
// Defines: WG (power of two; ops/norm.py picks 16 on CPU devices, where PoCL loops over the work-items
//     of a group on one core, and 64 on GPUs).
// Variants: kernel_rms_norm (with weight), kernel_rms_norm_noweight (weight == None).
// Reference: tests/test_ops_norm.py::ref_rms_norm (float64 numpy).

#ifndef WG
#define WG 64
#endif

// Sum of squares of one row, reduced over the work-group; every work-item gets the result.
#include "group_sum.h"

inline float row_sumsq(__global const float *xr, int row_len, __local float *part) {
    const int lid = get_local_id(0);
    const int n4 = row_len >> 2;
    float4 acc = (float4)(0.0f);
    for (int i = lid; i < n4; i += WG) {
        const float4 v = vload4(i, xr);
        acc = mad(v, v, acc);
    }
    float s = (acc.x + acc.y) + (acc.z + acc.w);
    for (int i = (n4 << 2) + lid; i < row_len; i += WG) {
        s = mad(xr[i], xr[i], s);
    }
    return group_sum(s, part);
}

#define RMS_NORM_BODY(WEIGHT4, WEIGHT1)                                                                \
    __local float part[WG];                                                                            \
    const int row = get_group_id(0);                                                                   \
    const int lid = get_local_id(0);                                                                   \
    __global const float *xr = x + (size_t)row * row_len;                                              \
    __global float *yr = y + (size_t)row * row_len;                                                    \
    const float scale = rsqrt(row_sumsq(xr, row_len, part) / (float)row_len + eps);                   \
    const int n4 = row_len >> 2;                                                                       \
    for (int i = lid; i < n4; i += WG) {                                                               \
        vstore4(vload4(i, xr) * scale WEIGHT4, i, yr);                                                 \
    }                                                                                                  \
    for (int i = (n4 << 2) + lid; i < row_len; i += WG) {                                              \
        yr[i] = xr[i] * scale WEIGHT1;                                                                 \
    }

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_rms_norm(__global const float *x, __global float *y, __global const float *weight,
                     const int row_len, const float eps) {
    RMS_NORM_BODY(* vload4(i, weight), * weight[i])
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_rms_norm_noweight(__global const float *x, __global float *y, const int row_len,
                              const float eps) {
    RMS_NORM_BODY(, )
}
