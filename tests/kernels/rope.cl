// rope.cl - rotary position embedding, in place, as ggml computes it (ggml-cpu ops.cpp rope_f32 with
// ext_factor = 0, attn_factor = 1, no frequency factors).
//
// x is viewed as [n_tokens, n_head, head_dim] with `row_stride` floats between tokens. For token t at
// position p = pos[t], head h, and i < n_rot / 2:
//     theta_i = p * freq_scale * freq_base^(-2i / n_rot)
//     (x0, x1) <- (x0 cos theta_i - x1 sin theta_i, x0 sin theta_i + x1 cos theta_i)
// where (x0, x1) are dims (2i, 2i+1) for kernel_rope_norm (llama, GGML_ROPE_TYPE_NORMAL) and
// (i, i + n_rot/2) for kernel_rope_neox (qwen2/qwen3, GGML_ROPE_TYPE_NEOX). Dims >= n_rot are untouched.
// freq_base^(-2i/n_rot) is computed as exp2(i * log2_theta_scale) with log2_theta_scale =
// -2 log2(freq_base) / n_rot from the host; ggml multiplies theta by theta_scale once per pair instead.
// Both round in float32; at position p the angle itself carries ~p * 6e-8 rad of rounding either way.
//
// NDRange: 2-D (pair i, token t); global = (n_rot/2, n_tokens), no local size needed. Each work-item
//     computes cos/sin of its angle once and rotates that pair in every head (sincos with full-precision
//     argument reduction dominates: on PoCL one work-item per head made rope of 512 tokens x 16 heads take
//     9.7 ms). Exact grid, so no bounds check.
// Defines: none. Variants: the two entry points above, one program.
// Reference: tests/test_ops_rope.py::ref_rope (float64 numpy, written from ggml's loop).

#define ROPE_LOOP(I0, I1)                                                                            \
    const int i = get_global_id(0);                                                                 \
    const int t = get_global_id(1);                                                                 \
    const float theta = (float)pos[t] * freq_scale * exp2((float)i * log2_theta_scale);             \
    float c;                                                                                        \
    const float s = sincos(theta, &c);                                                              \
    __global float *xt = x + (size_t)t * row_stride;                                                \
    for (int h = 0; h < n_head; h++) {                                                              \
        __global float *xh = xt + h * head_dim;                                                     \
        const float a = xh[I0];                                                                     \
        const float b = xh[I1];                                                                     \
        xh[I0] = a * c - b * s;                                                                     \
        xh[I1] = a * s + b * c;                                                                     \
    }

__kernel void kernel_rope_norm(__global float *x, __global const int *pos, const int n_head,
                               const int head_dim, const int row_stride, const int n_rot,
                               const float freq_scale, const float log2_theta_scale) {
    ROPE_LOOP(2 * i, 2 * i + 1)
}

__kernel void kernel_rope_neox(__global float *x, __global const int *pos, const int n_head,
                               const int head_dim, const int row_stride, const int n_rot,
                               const float freq_scale, const float log2_theta_scale) {
    ROPE_LOOP(i, i + n_rot / 2)
}
