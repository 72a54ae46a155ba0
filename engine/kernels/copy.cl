// copy.cl - device memory bandwidth probe: dst[i] = src[i], streamed once.
//
// The probe answers "how many bytes per second can a kernel move here", the roof that the mat-vec and
// attention figures are compared against (bytes read + bytes written per second).
// kernel_copy_f4:  one float4 per work-item   (16 B; GPUs coalesce neighbouring work-items)
// kernel_copy_f16: one float16 per work-item  (64 B, one cache line; a CPU core copies a line per item)
// NDRange: 1-D, global = number of vectors, local = 64; ops/bandwidth.py sizes the copy to a multiple of
//     64 vectors, so the grid is exact and there is no bounds check.
// Defines: none.
// Reference: tests/test_bandwidth.py (numpy equality of dst and src).

__kernel void kernel_copy_f4(__global const float4 *src, __global float4 *dst) {
    const size_t i = get_global_id(0);
    dst[i] = src[i];
}

__kernel void kernel_copy_f16(__global const float16 *src, __global float16 *dst) {
    const size_t i = get_global_id(0);
    dst[i] = src[i];
}
