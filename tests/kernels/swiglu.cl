// swiglu.cl - y[i] = silu(gate[i]) * up[i] over separate gate and up buffers (y may alias either): a test
// kernel, the element-wise form of engine/kernels/elementwise.cl's kernel_swiglu_fused (which the models use).
// NDRange 1-D, work-item g handles the float4 at 4g, a scalar tail when n * n_tokens is not a multiple of 4.

// exp(-g) overflows to +inf for g < -88: g / inf = -0, the limit of silu, so no clamp is needed.
__kernel void kernel_swiglu(__global const float *gate, __global const float *up, __global float *y,
                            const int n, const int n_tokens) {
    const int total = n * n_tokens;
    const int i = get_global_id(0) * 4;
    if (i + 4 <= total) {
        const float4 g = vload4(0, gate + i);
        vstore4(g / (1.0f + exp(-g)) * vload4(0, up + i), 0, y + i);
    } else {
        for (int j = i; j < total; j++) {
            const float g = gate[j];
            y[j] = g / (1.0f + exp(-g)) * up[j];
        }
    }
}
