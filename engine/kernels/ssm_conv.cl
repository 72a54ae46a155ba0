// ssm_conv.cl - causal depthwise conv1d with a rolling state, then SiLU (Gated DeltaNet input, qwen35).
//
// Computes, for each token t of a batch that may mix sequences (s = seqs[t], the slot of token t) and each
// channel c < channels, with X_s[:, c] the inputs of sequence s in batch order:
//     w_t = (state[s, :, c] ++ X_s[:, c]) window of the K inputs ending at x[t, c]  (K = kernel size)
//     y[t, c] = silu(sum_i w_t[i] * weight[c, i])
// then state[s, :, c] = the last K - 1 inputs of (state[s, :, c] ++ X_s[:, c]), oldest first, for every
// sequence s in the batch; the states of other sequences are not touched. A token whose seqs[t] is
// outside [0, n_seq) is skipped: y[t] is not written and no state moves.
// Layouts: x, y float32 [n_tokens, channels] (row stride `channels`); weight float32 [channels, K]
// (GGUF ssm_conv1d, ne = {K, channels}); state float32 [n_seq, K - 1, channels]; seqs int32 [n_tokens].
// y may alias x: each work-item reads x[t, c] before it writes y[t, c] and touches no other channels.
// SiLU is applied here because qwen35 / qwen3next always apply it right after ssm_conv.
//
// NDRange: 1-D, one work-item per VW consecutive channels (global = channels / VW rounded up to the local
//     size; items past the end return). The token loop runs inside the work-item with the window in
//     registers: the conv is a few FMAs per token, so parallelism comes from the thousands of channels,
//     and neighbouring work-items touch neighbouring addresses (coalesced on GPUs). The loop loads TB
//     tokens' inputs before it stores their outputs: with y aliasing x the compiler may not move a load
//     of x[t + 1] above the store of y[t], so a token at a time costs a GPU a memory round trip per token.
//     Loading ahead is safe: the only output aliasing x[t + k, c] is y[t + k, c], which this work-item
//     stores after it. (512 tokens x 12288 channels on an H100: 0.113 -> 0.082 ms.)
// Variants: VW = 1 on GPUs (the most work-items); on CPUs VW = 16 (or the largest of 8, 4, 2 dividing
//     channels): PoCL runs a group's work-items as a loop around the token loop and does not vectorise
//     across them, so the vector type is what puts the FMAs and the SiLU's exp in SIMD lanes (same
//     shape on PoCL, AVX-512: 43 -> 5.5 ms).
// Sequences: the work-item walks the batch run by run (a run: consecutive tokens of one sequence, found
//     by run_end, which scans seqs 8 tokens per step). It loads the run's sequence state into the
//     window, rolls it over the run and stores it back, so a batch of runs [s2 s2 s2 s0 s5 s5] costs one
//     load and one store per run, and a sequence that comes back in a later run resumes from what its
//     earlier run stored (each work-item reads back only its own channels, so no fence is needed).
// Defines: KS (kernel size, 4 in every Qwen3.5 / Qwen3-Next GGUF), VW (channels per work-item, divides
//     channels).
// Reference: tests/delta_net_reference.py::ssm_conv.

#ifndef KS
#define KS 4
#endif
#ifndef VW
#define VW 1
#endif
#define TB 8  // tokens whose inputs are loaded before any of their outputs is stored

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#if VW == 1
typedef float floatv;
#define LOADV(p) (*(p))
#define STOREV(v, p) (*(p) = (v))
#else
typedef CAT(float, VW) floatv;
#define LOADV(p) CAT(vload, VW)(0, p)
#define STOREV(v, p) CAT(vstore, VW)(v, 0, p)
#endif

#include "seq_runs.h"

__kernel void kernel_ssm_conv(__global const float *x, __global float *y, __global const float *weight,
                              __global float *state, __global const int *seqs, const int channels,
                              const int n_seq, const int n_tokens) {
    const int c = get_global_id(0) * VW;  // first channel of this work-item
    if (c >= channels) {
        return;
    }
    floatv w[KS];
    floatv win[KS];  // win[KS - 1] is the newest input, win[0 .. KS - 2] the state of the run's sequence
    for (int i = 0; i < KS; i++) {
#if VW == 1
        w[i] = weight[(size_t)c * KS + i];
#else
        float wl[VW];  // weight is [channels, KS]: lane l of tap i is weight[c + l, i]
        for (int l = 0; l < VW; l++) {
            wl[l] = weight[(size_t)(c + l) * KS + i];
        }
        w[i] = LOADV(wl);
#endif
    }
    for (int r0 = 0, r1 = 0; r0 < n_tokens; r0 = r1) {
        const int s = seqs[r0];
        r1 = run_end(seqs, r0, n_tokens);  // the run [r0, r1): consecutive tokens of sequence s
        if (s < 0 || s >= n_seq) {
            continue;  // a bad slot must not touch memory outside the state buffer: its tokens are skipped
        }
        __global float *st = state + (size_t)s * (KS - 1) * channels + c;
        for (int i = 0; i < KS - 1; i++) {
            win[i] = LOADV(st + (size_t)i * channels);
        }
        for (int t0 = r0; t0 < r1; t0 += TB) {
            floatv xs[TB];
            for (int k = 0; k < TB; k++) {
                if (t0 + k < r1) {
                    xs[k] = LOADV(x + (size_t)(t0 + k) * channels + c);
                }
            }
            for (int k = 0; k < TB; k++) {
                if (t0 + k < r1) {
                    win[KS - 1] = xs[k];
                    floatv acc = 0.0f;
                    for (int i = 0; i < KS; i++) {
                        acc = mad(win[i], w[i], acc);
                    }
                    STOREV(acc / (1.0f + exp(-acc)), y + (size_t)(t0 + k) * channels + c);
                    for (int i = 0; i < KS - 1; i++) {
                        win[i] = win[i + 1];
                    }
                }
            }
        }
        for (int i = 0; i < KS - 1; i++) {
            STOREV(win[i], st + (size_t)i * channels);
        }
    }
}
