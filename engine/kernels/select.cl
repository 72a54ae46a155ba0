// select.cl - per-row argmax and top-k of logits, on the device, so that only a few bytes per row come back.
//
// kernel_argmax: out[r] = index of the largest logits[r, :]; ties -> lowest index (numpy.argmax). NaNs are
//     skipped; a row of -inf only gives 0, as numpy does.
// kernel_top_k:  out_ids[r, 0..K) / out_vals[r, 0..K) = the K largest logits of row r, sorted descending;
//     equal values in ascending index order (so entry 0 is the argmax).
//
// NDRange: 1-D, one work-group of WG work-items per row: global = n_rows * WG, local = WG.
//   Each work-item scans a part of the row with float4 loads, keeping its own best (argmax: one (value,
//   index) per float4 lane; top-k: a sorted list of K in local memory, entered only by values that beat its
//   K-th, so after the first few thousand elements almost every float4 is rejected by one compare), then
//   the work-group merges: argmax by a local-memory tree of (value, index) pairs, top-k by a tree of pairwise
//   merges of sorted lists (log2(WG) rounds of K steps).
//   CONTIGUOUS=1: work-item i scans one contiguous span of the row - for CPU devices (PoCL), where one core
//     runs the work-items of a group one after another and a span streams through its cache.
//   CONTIGUOUS=0: work-item i scans float4 chunks i, i+WG, ... - for GPUs, where neighbouring work-items then
//     read neighbouring addresses (coalesced).
//   The n_vocab % 4 tail is scanned by work-item 0.
// Defines: WG (power of two), CONTIGUOUS (0/1), K (top-k only, 1..64).
// Reference: tests/test_ops_select.py (numpy argmax; a stable descending argsort for top-k).

#ifndef WG
#define WG 256
#endif
#ifndef CONTIGUOUS
#define CONTIGUOUS 0
#endif
#ifndef K
#define K 1
#endif

#define NO_INDEX 0x7fffffff

// (va, ia) ranks before (vb, ib): a larger value, or an equal value with a lower index.
inline bool before(const float va, const int ia, const float vb, const int ib) {
    return va > vb || (va == vb && ia < ib);
}

// The float4 chunks [c0, c1) of a row of n4 chunks that work-item lid scans, and the step between them.
#if CONTIGUOUS
#define CHUNK_LOOP(n4, c)                                                                             \
    const int span_ = ((n4) + WG - 1) / WG;                                                           \
    const int c1_ = min((n4), (lid + 1) * span_);                                                     \
    for (int c = lid * span_; c < c1_; c++)
#else
#define CHUNK_LOOP(n4, c) for (int c = lid; c < (n4); c += WG)
#endif

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_argmax(__global const float *logits, __global int *out, const int n_vocab) {
    __local float lv[WG];
    __local int li[WG];
    const int row = get_group_id(0);
    const int lid = get_local_id(0);
    __global const float *p = logits + (size_t)row * n_vocab;
    const int n4 = n_vocab >> 2;

    // per lane: each lane sees increasing indices, so a strict > keeps the first of equal values
    float4 bv = (float4)(-INFINITY);
    int4 bi = (int4)(NO_INDEX);
    CHUNK_LOOP(n4, c) {
        const float4 v = vload4(c, p);
        const int4 gt = isgreater(v, bv);
        bv = select(bv, v, gt);
        bi = select(bi, (int4)(4 * c) + (int4)(0, 1, 2, 3), gt);
    }
    float best = bv.x;
    int besti = bi.x;
    if (before(bv.y, bi.y, best, besti)) { best = bv.y; besti = bi.y; }
    if (before(bv.z, bi.z, best, besti)) { best = bv.z; besti = bi.z; }
    if (before(bv.w, bi.w, best, besti)) { best = bv.w; besti = bi.w; }
    if (lid == 0) {
        for (int j = n4 << 2; j < n_vocab; j++) {
            if (p[j] > best) { best = p[j]; besti = j; }
        }
    }
    lv[lid] = best;
    li[lid] = besti;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = WG >> 1; off > 0; off >>= 1) {
        if (lid < off && before(lv[lid + off], li[lid + off], lv[lid], li[lid])) {
            lv[lid] = lv[lid + off];
            li[lid] = li[lid + off];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        out[row] = li[0] == NO_INDEX ? 0 : li[0];
    }
}

// Insert (v, j) into the sorted list (lv, li) of K if it ranks before the list's last entry.
inline void list_offer(__local float *lv, __local int *li, const float v, const int j) {
    if (!before(v, j, lv[K - 1], li[K - 1])) {
        return;
    }
    int at = K - 1;
    while (at > 0 && before(v, j, lv[at - 1], li[at - 1])) {
        lv[at] = lv[at - 1];
        li[at] = li[at - 1];
        at--;
    }
    lv[at] = v;
    li[at] = j;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void kernel_top_k(__global const float *logits, __global int *out_ids, __global float *out_vals,
                  const int n_vocab) {
    __local float lv[WG * K];
    __local int li[WG * K];
    const int row = get_group_id(0);
    const int lid = get_local_id(0);
    __global const float *p = logits + (size_t)row * n_vocab;
    const int n4 = n_vocab >> 2;
    __local float *mv = lv + lid * K;
    __local int *mi = li + lid * K;

    for (int j = 0; j < K; j++) {
        mv[j] = -INFINITY;
        mi[j] = NO_INDEX;
    }
    CHUNK_LOOP(n4, c) {
        const float4 v = vload4(c, p);
        // the common case: nothing in this float4 beats the K-th kept value (while the list still holds
        // empty entries, mi[K-1] == NO_INDEX and every value goes through list_offer)
        if (any(isgreater(v, (float4)(mv[K - 1]))) || mi[K - 1] == NO_INDEX) {
            list_offer(mv, mi, v.x, 4 * c);
            list_offer(mv, mi, v.y, 4 * c + 1);
            list_offer(mv, mi, v.z, 4 * c + 2);
            list_offer(mv, mi, v.w, 4 * c + 3);
        }
    }
    if (lid == 0) {
        for (int j = n4 << 2; j < n_vocab; j++) {
            list_offer(mv, mi, p[j], j);
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    // tree merge: list lid takes the best K of itself and list lid + off
    for (int off = WG >> 1; off > 0; off >>= 1) {
        if (lid < off) {
            float tv[K];
            int ti[K];
            __local const float *bv = lv + (lid + off) * K;
            __local const int *bi = li + (lid + off) * K;
            int a = 0, b = 0;
            for (int j = 0; j < K; j++) {
                if (before(bv[b], bi[b], mv[a], mi[a])) {
                    tv[j] = bv[b]; ti[j] = bi[b]; b++;
                } else {
                    tv[j] = mv[a]; ti[j] = mi[a]; a++;
                }
            }
            for (int j = 0; j < K; j++) {
                mv[j] = tv[j];
                mi[j] = ti[j];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int j = lid; j < K; j += WG) {
        out_ids[(size_t)row * K + j] = li[j];
        out_vals[(size_t)row * K + j] = lv[j];
    }
}
