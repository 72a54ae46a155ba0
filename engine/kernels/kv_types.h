// kv_types.h - the element types of the KV cache (llama-server's --cache-type-k / --cache-type-v) and how a
// cache row is stored and loaded.
//
// A cache row is one (sequence, position, kv head): D values of K (or V), stored as
//   KV_F16   half[D]                                              2 D bytes
//   KV_Q8_0  D/32 blocks of { half d; char q[32] }, x = d q      34 bytes per 32 values (ggml's block_q8_0)
//   KV_Q4_0  D/32 blocks of { half d; uchar q[16] }, x = d (q - 8), byte j: value j (low nibble) and
//            value j + 16 (high nibble)                           18 bytes per 32 values (ggml's block_q4_0)
// quantized as ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref do. The type is a compile-time define
// (K_TYPE / V_TYPE), so every branch on it folds away.
// Reference: tests/test_kv_types.py (numpy, and gguf.quants for the block formats).

#ifndef NEXTN_KV_TYPES_H
#define NEXTN_KV_TYPES_H

#define KV_F16 0
#define KV_Q8_0 1
#define KV_Q4_0 2

#ifndef K_TYPE
#define K_TYPE KV_F16
#endif
#ifndef V_TYPE
#define V_TYPE KV_F16
#endif

// A sliding-window layer's cache may be a ring of KV_RING rows per sequence (ops/attention.py: ring_rows):
// position p lives in row p % KV_RING. Without KV_RING a sequence has n_ctx rows and p lives in row p (the
// kernels' n_ctx argument still bounds the positions either way).
#ifdef KV_RING
#define KV_SEQ_ROWS(n_ctx) KV_RING
#define KV_SLOT(p) ((p) % KV_RING)
#else
#define KV_SEQ_ROWS(n_ctx) (n_ctx)
#define KV_SLOT(p) (p)
#endif

#define KV_ROW_BYTES(type, d) ((type) == KV_F16 ? 2 * (d) : (type) == KV_Q8_0 ? (d) / 32 * 34 : (d) / 32 * 18)

// Cache layout: [n_seq, n_head_kv, KV_SEQ_ROWS(n_ctx)] rows, head-major: the rows one kv head reads for one
// sequence are one contiguous stream (position after position). With the rows of all kv heads of a position
// side by side instead, a head's walk strides n_head_kv rows per position, and the CPU's prefetchers lose
// it: decode attention after 4096 positions read 7.8 GB/s that way against 16.4-17.8 GB/s head-major
// (8 kv heads of 128, 2 cores, a cache larger than the L3). The index of the row of (sequence s, kv head g,
// slot r):
#define KV_ROW(s, g, r, n_head_kv, n_ctx) ((((size_t)(s) * (n_head_kv) + (g)) * KV_SEQ_ROWS(n_ctx)) + (r))

// Store the d values x (private memory) as one cache row of `type`.
inline void kv_store_row(__global uchar *row, const float *x, const int d, const int type) {
    if (type == KV_F16) {
        for (int i = 0; i < d; i++) {
            vstore_half_rte(x[i], i, (__global half *)row);
        }
        return;
    }
    for (int b = 0; b < d / 32; b++) {
        const float *xb = x + 32 * b;
        if (type == KV_Q8_0) {
            __global uchar *blk = row + 34 * b;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) {
                amax = fmax(amax, fabs(xb[j]));
            }
            const float dq = amax / 127.0f;
            const float id = dq != 0.0f ? 1.0f / dq : 0.0f;
            vstore_half_rte(dq, 0, (__global half *)blk);
            __global char *q = (__global char *)(blk + 2);
            for (int j = 0; j < 32; j++) {
                q[j] = (char)round(xb[j] * id);  // roundf, as ggml; |x * id| <= 127: no clamp needed
            }
        } else {
            __global uchar *blk = row + 18 * b;
            float amax = 0.0f, vmax = 0.0f;  // the value of largest magnitude, with its sign
            for (int j = 0; j < 32; j++) {
                if (amax < fabs(xb[j])) {
                    amax = fabs(xb[j]);
                    vmax = xb[j];
                }
            }
            const float dq = vmax / -8.0f;
            const float id = dq != 0.0f ? 1.0f / dq : 0.0f;
            vstore_half_rte(dq, 0, (__global half *)blk);
            for (int j = 0; j < 16; j++) {
                const int lo = min(15, (int)(xb[j] * id + 8.5f));
                const int hi = min(15, (int)(xb[j + 16] * id + 8.5f));
                blk[2 + j] = (uchar)(lo | (hi << 4));
            }
        }
    }
}

#endif  // NEXTN_KV_TYPES_H
