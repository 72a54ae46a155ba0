// group_sum.h - the sum of one float per work-item over a 1-D work-group of WG (a power of two) items,
// by a tree in local memory; every work-item gets the total. Shared by norm.cl and delta_net.cl.

#ifndef NEXTN_GROUP_SUM_H
#define NEXTN_GROUP_SUM_H

inline float group_sum(float s, __local float *part) {
    const int lid = get_local_id(0);
    part[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int off = WG >> 1; off > 0; off >>= 1) {
        if (lid < off) {
            part[lid] += part[lid + off];
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return part[0];
}

#endif
