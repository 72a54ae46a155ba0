// ssm_conv.cl - causal depthwise conv1d with a rolling state, then SiLU (Gated DeltaNet input, qwen35).
//
// Computes, for the n_tokens tokens of ONE sequence s = seqs[0] and each channel c < channels:
//     w_t = (state[s, :, c] ++ x[:, c])[t .. t + K - 1]           (K = kernel size, state holds K - 1)
//     y[t, c] = silu(sum_i w_t[i] * weight[c, i])
// then state[s, :, c] = the last K - 1 inputs of (state[s, :, c] ++ x[:, c]), oldest first.
// Layouts: x, y float32 [n_tokens, channels] (row stride `channels`); weight float32 [channels, K]
// (GGUF ssm_conv1d, ne = {K, channels}); state float32 [n_seq, K - 1, channels]. y may alias x: each
// work-item reads x[t, c] before it writes y[t, c] and touches no other channel.
// SiLU is applied here because qwen35 / qwen3next always apply it right after ssm_conv.
//
// NDRange: 1-D, one work-item per channel (global = channels rounded up to the local size; items past
//     `channels` return). The token loop runs inside the work-item with the window in registers: the
//     conv is a few FMAs per token, so parallelism comes from the thousands of channels, and neighbouring
//     work-items touch neighbouring addresses (coalesced on GPUs, vectorised by PoCL).
// Defines: KS (kernel size, 4 in every Qwen3.5 / Qwen3-Next GGUF).
// Reference: tests/delta_net_reference.py::ssm_conv.

#ifndef KS
#define KS 4
#endif

__kernel void kernel_ssm_conv(__global const float *x, __global float *y, __global const float *weight,
                              __global float *state, __global const int *seqs, const int channels,
                              const int n_seq, const int n_tokens) {
    const int c = get_global_id(0);
    if (c >= channels) {
        return;
    }
    const int s = seqs[0];
    if (s < 0 || s >= n_seq) {
        return;  // a bad slot must not write outside the state buffer
    }
    __global float *st = state + (size_t)s * (KS - 1) * channels + c;
    float w[KS];
    float win[KS];  // win[KS - 1] is the newest input
    for (int i = 0; i < KS; i++) {
        w[i] = weight[(size_t)c * KS + i];
    }
    for (int i = 0; i < KS - 1; i++) {
        win[i] = st[(size_t)i * channels];
    }
    for (int t = 0; t < n_tokens; t++) {
        win[KS - 1] = x[(size_t)t * channels + c];
        float acc = 0.0f;
        for (int i = 0; i < KS; i++) {
            acc = mad(win[i], w[i], acc);
        }
        y[(size_t)t * channels + c] = acc / (1.0f + exp(-acc));
        for (int i = 0; i < KS - 1; i++) {
            win[i] = win[i + 1];
        }
    }
    for (int i = 0; i < KS - 1; i++) {
        st[(size_t)i * channels] = win[i];
    }
}
