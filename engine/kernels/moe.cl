// moe.cl - routing, grouping and combining for a mixture-of-experts FFN (qwen35moe's build_moe_ffn with
// softmax gating and normalized weights; GLM-4.5's with sigmoid gating and a selection bias), plus the
// sigmoid-gated shared-expert add.
//
// The expert products themselves are kernel_matmul_id_<type>_f32 (quants.h MM_KERNEL_ID) and the
// activation is kernel_swiglu_fused; engine/ops/moe.py::moe_ffn chains, per step of n_tokens tokens:
//   logits = cur @ gate_inp^T                        (kernel_matmul_<type>_f32)
//   kernel_moe_route:   per token softmax, top n_used, normalized weights          -> ids, wts [t, k]
//   kernel_moe_sort:    counting sort of the n_tokens * n_used (token, k) pairs by expert
//                       -> bounds [n_expert + 1], pair_token [row], pair_slot [t * n_used + k]
//   gather_rows:        xg[row] = cur[pair_token[row]]                  (rows grouped by expert)
//   matmul_id gate|up -> gu [row, 2 n_ff]; swiglu_fused -> act [row, n_ff]; matmul_id down -> yd [row, n_embd]
//   kernel_moe_combine: x[t] += sum_k wts[t, k] * yd[pair_slot[t * n_used + k]]  (k ascending)
//
// kernel_moe_route: NDRange 1-D, one work-item per token (global >= n_tokens, any local size). Selection is
//   by logit, which orders the experts as the softmax probabilities do without their rounding; ties go to the
//   lower expert index (ggml's argsort, numpy's stable argsort). w_k = p_k / max(sum_k p_k, 2^-14) * w_scale
//   (the host passes w_scale = 1 when the model's scale is 0 or 1). A row of NaN logits still yields valid
//   expert ids (weight 0), so the later kernels never index out of bounds.
// kernel_moe_sort: NDRange 1-D, exactly ONE work-group of any size; cnt is local memory of n_expert ints.
//   Work-item i counts the pairs of experts i, i + size, ... (a scan over the pairs per expert: at most
//   n_expert * n_used * n_tokens compares, e.g. 64 * 8 * 512, cheaper than atomics would be to make
//   deterministic), one work-item forms the exclusive prefix sum, then each work-item places its experts'
//   pairs in (token, k) order. Rows of one expert are therefore always in the same order: deterministic.
// kernel_moe_combine, kernel_moe_shared_add: NDRange 2-D (ceil(n_embd / 4), n_tokens rows), any local size;
//   work-item (c, t) owns columns [4c, 4c + 4) of token t (scalar when the row ends inside them).
// Defines: none (one program for every shape).
// Reference: tests/reference.py::moe_ffn (float64), tests/test_ops_moe.py.

// the smallest normal half: ggml clamps the sum of the selected probabilities to it before dividing
#define MOE_MIN_WSUM 6.103515625e-5f

__kernel void kernel_moe_route(__global const float *logits, __global int *ids, __global float *wts,
                               const int n_expert, const int n_used, const float w_scale, const int n_tokens) {
    const int t = get_global_id(0);
    if (t >= n_tokens) {
        return;
    }
    __global const float *l = logits + (size_t)t * n_expert;
    float m = -INFINITY;
    for (int e = 0; e < n_expert; e++) {
        m = fmax(m, l[e]);
    }
    float sum = 0.0f;
    for (int e = 0; e < n_expert; e++) {
        sum += exp(l[e] - m);
    }
    // pass k picks the best expert strictly after pick k - 1 in the order (logit descending, index ascending)
    float prev_l = INFINITY;
    int prev_e = -1;
    float wsum = 0.0f;
    for (int k = 0; k < n_used; k++) {
        int best = -1;
        float best_l = -INFINITY;
        for (int e = 0; e < n_expert; e++) {
            const float v = l[e];
            const int after = v < prev_l || (v == prev_l && e > prev_e);
            if (after && (best < 0 || v > best_l)) {
                best = e;
                best_l = v;
            }
        }
        float p = 0.0f;
        if (best < 0) {  // only NaN left: any valid id, weight 0
            best = k % n_expert;
        } else {
            p = exp(best_l - m) / sum;
            prev_l = best_l;
            prev_e = best;
        }
        ids[(size_t)t * n_used + k] = best;
        wts[(size_t)t * n_used + k] = p;
        wsum += p;
    }
    const float f = w_scale / fmax(wsum, MOE_MIN_WSUM);
    for (int k = 0; k < n_used; k++) {
        wts[(size_t)t * n_used + k] *= f;
    }
}

// GLM-4.5's routing (build_moe_ffn with sigmoid gating and an expert-selection bias): p_e = sigmoid(logit_e);
// the top n_used by p_e + bias_e (descending, ties to the lower index); weights p_k (without the bias),
// divided by max(sum_k p_k, 2^-14) when norm, times w_scale. NDRange as kernel_moe_route. NaN logits: valid
// ids with weight 0, as there.
__kernel void kernel_moe_route_sigmoid(__global const float *logits, __global const float *bias,
                                       __global int *ids, __global float *wts, const int n_expert,
                                       const int n_used, const float w_scale, const int norm, const int n_tokens) {
    const int t = get_global_id(0);
    if (t >= n_tokens) {
        return;
    }
    __global const float *l = logits + (size_t)t * n_expert;
    float prev_s = INFINITY;
    int prev_e = -1;
    float wsum = 0.0f;
    for (int k = 0; k < n_used; k++) {
        int best = -1;
        float best_s = -INFINITY;
        for (int e = 0; e < n_expert; e++) {
            const float v = 1.0f / (1.0f + exp(-l[e])) + bias[e];
            const int after = v < prev_s || (v == prev_s && e > prev_e);
            if (after && (best < 0 || v > best_s)) {
                best = e;
                best_s = v;
            }
        }
        float p = 0.0f;
        if (best < 0) {  // only NaN left: any valid id, weight 0
            best = k % n_expert;
        } else {
            p = 1.0f / (1.0f + exp(-l[best]));
            prev_s = best_s;
            prev_e = best;
        }
        ids[(size_t)t * n_used + k] = best;
        wts[(size_t)t * n_used + k] = p;
        wsum += p;
    }
    const float f = norm ? w_scale / fmax(wsum, MOE_MIN_WSUM) : w_scale;
    for (int k = 0; k < n_used; k++) {
        wts[(size_t)t * n_used + k] *= f;
    }
}

__kernel void kernel_moe_sort(__global const int *ids, __global int *bounds, __global int *pair_token,
                              __global int *pair_slot, __local int *cnt, const int n_expert, const int n_used,
                              const int n_tokens) {
    const int lid = get_local_id(0);
    const int nl = get_local_size(0);
    const int n_pairs = n_tokens * n_used;
    for (int e = lid; e < n_expert; e += nl) {
        int c = 0;
        for (int p = 0; p < n_pairs; p++) {
            c += ids[p] == e;
        }
        cnt[e] = c;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        int s = 0;
        for (int e = 0; e < n_expert; e++) {
            const int c = cnt[e];
            cnt[e] = s;
            bounds[e] = s;
            s += c;
        }
        bounds[n_expert] = s;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int e = lid; e < n_expert; e += nl) {
        int s = cnt[e];
        const int end = e + 1 < n_expert ? cnt[e + 1] : n_pairs;
        for (int p = 0; p < n_pairs && s < end; p++) {
            if (ids[p] == e) {
                pair_token[s] = p / n_used;
                pair_slot[p] = s;
                s++;
            }
        }
    }
}

__kernel void kernel_moe_combine(__global const float *yd, __global const int *pair_slot,
                                 __global const float *wts, __global float *x, const int n_embd, const int n_used,
                                 const int n_tokens) {
    const int c = get_global_id(0) * 4;
    const int t = get_global_id(1);
    if (t >= n_tokens || c >= n_embd) {
        return;
    }
    __global float *xt = x + (size_t)t * n_embd;
    if (c + 4 <= n_embd) {
        float4 acc = (float4)(0.0f);
        for (int k = 0; k < n_used; k++) {
            const int p = t * n_used + k;
            acc = fma((float4)(wts[p]), vload4(0, yd + (size_t)pair_slot[p] * n_embd + c), acc);
        }
        vstore4(vload4(0, xt + c) + acc, 0, xt + c);
    } else {
        for (int i = c; i < n_embd; i++) {
            float acc = 0.0f;
            for (int k = 0; k < n_used; k++) {
                const int p = t * n_used + k;
                acc = fma(wts[p], yd[(size_t)pair_slot[p] * n_embd + i], acc);
            }
            xt[i] += acc;
        }
    }
}

// x[t, :] += sigmoid(gate_logit[t]) * y_sh[t, :]  (qwen35moe's shared expert, gated per token)
__kernel void kernel_moe_shared_add(__global const float *y_sh, __global const float *gate_logit, __global float *x,
                                    const int n_embd, const int n_tokens) {
    const int c = get_global_id(0) * 4;
    const int t = get_global_id(1);
    if (t >= n_tokens || c >= n_embd) {
        return;
    }
    const float g = 1.0f / (1.0f + exp(-gate_logit[t]));
    __global float *xt = x + (size_t)t * n_embd;
    __global const float *yt = y_sh + (size_t)t * n_embd;
    if (c + 4 <= n_embd) {
        vstore4(fma((float4)(g), vload4(0, yt + c), vload4(0, xt + c)), 0, xt + c);
    } else {
        for (int i = c; i < n_embd; i++) {
            xt[i] = fma(g, yt[i], xt[i]);
        }
    }
}
