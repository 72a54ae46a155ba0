// elementwise.cl - element-wise ops on activations: residual add, SwiGLU, row gather.
//
// kernel_add:     y[i] = a[i] + b[i]                      for i < n_tokens * n   (y may alias a or b)
// kernel_swiglu_fused: y[t, i] = silu(gu[t, i]) * gu[t, n_ff + i]  (the gate|up projections side by side)
// kernel_gather_rows_f4 / _f1:  y[i, :] = x[idx[i], :]    for i < n_rows        (idx int32)
// kernel_add_bias: y[t, i] += bias[i] for i < width, t < n_tokens (rows of width floats: a projection's bias)
// kernel_swiglu_clamp: y[t, i] = min(silu(g), limit) * clamp(u, -limit, limit)  (step35's SwiGLU limits)
// kernel_head_gate: y[t, h * hd + d] *= sigmoid(g[t, h])  (step35's head-wise attention gate)
//
// NDRange:
//   add: 1-D, work-item g handles the float4 at 4g (a scalar tail when the total is not a multiple
//     of 4); global = n_tokens * ceil(n / 4) rounded up to the local size (64), so the kernel bounds itself
//     by n * n_tokens (n_tokens is the per-step argument).
//   gather_rows: 2-D (chunk of the row, row); global = (ceil(row_len / V) rounded up to 64, n_rows),
//     local = (64, 1); _f4 moves float4 chunks (row_len % 4 == 0), _f1 single floats. The grid has at
//     least one row even when n_rows is 0, and idx[0] may then be stale: the n_rows bound keeps that
//     row from reading x out of bounds.
// Defines: none.
// Reference: tests/test_ops_elementwise.py (numpy: a + b, g / (1 + np.exp(-g)) * u, x[idx]).

__kernel void kernel_add(__global const float *a, __global const float *b, __global float *y, const int n,
                         const int n_tokens) {
    const int total = n * n_tokens;
    const int i = get_global_id(0) * 4;
    if (i + 4 <= total) {
        vstore4(vload4(0, a + i) + vload4(0, b + i), 0, y + i);
    } else {
        for (int j = i; j < total; j++) {
            y[j] = a[j] + b[j];
        }
    }
}

__kernel void kernel_gather_rows_f4(__global const float *x, __global const int *idx, __global float *y,
                                    const int row_len, const int n_rows) {
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c < (row_len >> 2) && r < n_rows) {
        vstore4(vload4(c, x + (size_t)idx[r] * row_len), c, y + (size_t)r * row_len);
    }
}

__kernel void kernel_gather_rows_f1(__global const float *x, __global const int *idx, __global float *y,
                                    const int row_len, const int n_rows) {
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    if (c < row_len && r < n_rows) {
        y[(size_t)r * row_len + c] = x[(size_t)idx[r] * row_len + c];
    }
}

// swiglu over the fused gate|up projection: gu float32 [n_tokens, 2 * n_ff] (gate then up in each row),
// y[t, i] = silu(gu[t, i]) * gu[t, n_ff + i]. NDRange 2-D (n_ff, n_tokens rows).
// Reference: tests/test_ops_qkv.py (numpy), same formula as tests/kernels/swiglu.cl.
__kernel void kernel_swiglu_fused(__global const float *gu, __global float *y, const int n_ff, const int n_tokens) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (t >= n_tokens || i >= n_ff) {
        return;
    }
    const float g = gu[(size_t)t * 2 * n_ff + i];
    const float u = gu[(size_t)t * 2 * n_ff + n_ff + i];
    y[(size_t)t * n_ff + i] = g / (1.0f + exp(-g)) * u;
}

// y[t, i] += bias[i]: the biases of a Q|K|V projection row (qwen2, GLM). NDRange 2-D (width, n_tokens rows).
__kernel void kernel_add_bias(__global float *y, __global const float *bias, const int width, const int n_tokens) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (t >= n_tokens || i >= width) {
        return;
    }
    y[(size_t)t * width + i] += bias[i];
}

// step35's clamped SwiGLU (llama.cpp build_ffn / build_moe_ffn with swiglu_clamp_{shexp,exp}[il] > 0):
// y[t, i] = min(silu(g), limit) * clamp(u, -limit, limit), g and u as kernel_swiglu_fused reads them.
// NDRange 2-D (n_ff, n_tokens rows). Reference: tests/reference.py::swiglu_ffn (limit).
__kernel void kernel_swiglu_clamp(__global const float *gu, __global float *y, const int n_ff, const float limit,
                                  const int n_tokens) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (t >= n_tokens || i >= n_ff) {
        return;
    }
    const float g = gu[(size_t)t * 2 * n_ff + i];
    const float u = clamp(gu[(size_t)t * 2 * n_ff + n_ff + i], -limit, limit);
    y[(size_t)t * n_ff + i] = fmin(g / (1.0f + exp(-g)), limit) * u;
}

// step35's head-wise attention gate: y float32 [n_tokens, n_head * hd], g float32 [n_tokens, n_head] (the
// attn_gate projection): y[t, h * hd + d] *= sigmoid(g[t, h]). NDRange 2-D (n_head * hd, n_tokens rows).
// Reference: tests/reference.py::Step35ReferenceModel._layer.
__kernel void kernel_head_gate(__global float *y, __global const float *g, const int hd, const int n_head,
                               const int n_tokens) {
    const int i = get_global_id(0);
    const int t = get_global_id(1);
    if (t >= n_tokens || i >= n_head * hd) {
        return;
    }
    const float z = g[(size_t)t * n_head + i / hd];
    y[(size_t)t * n_head * hd + i] *= 1.0f / (1.0f + exp(-z));
}
