// seq_runs.h - runs of consecutive tokens of one sequence (slot) in a batch's per-token seqs array,
// shared by ssm_conv.cl and delta_net.cl.

#ifndef NEXTN_SEQ_RUNS_H
#define NEXTN_SEQ_RUNS_H

// The end of the run of tokens of sequence seqs[r0] that starts at r0, at most `limit`: the first t in
// (r0, limit) with seqs[t] != seqs[r0], else limit. It looks at 8 tokens per step with independent loads:
// a GPU work-item waits on every load it branches on, so a token-by-token scan costs a memory round
// trip per token.
inline int run_end(__global const int *seqs, const int r0, const int limit) {
    const int s = seqs[r0];
    for (int b = r0 + 1; b < limit; b += 8) {
        int m = 8;
        for (int k = 7; k >= 0; k--) {
            if (b + k < limit && seqs[b + k] != s) {
                m = k;
            }
        }
        if (m < 8) {
            return b + m;
        }
    }
    return limit;
}

#endif
