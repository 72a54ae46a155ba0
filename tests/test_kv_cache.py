"""KVCache's device copies in the head-major layout [n_seq, n_head_kv, rows] (kernels/kv_types.h: KV_ROW)."""

import numpy as np
import pyopencl as cl

from nextn.memory.kv_cache import KVCache
from nextn.ops.attention import kv_row_bytes


def test_copy_prefix_copies_each_kv_heads_rows(rt):
    """A prompt-cache copy from sequence 0 into sequence 2: of every kv head, the first n rows (a full layer)
    or the whole ring (a sliding-window layer) become sequence 0's; everything else keeps its bytes."""
    n_seq, n_ctx, head_dim, n = 3, 16, 32, 5
    heads, rows = [3, 2], [16, 8]
    cache = KVCache(rt, n_seq, n_ctx, 3, head_dim, [("f16", "q8_0"), ("q4_0", "f16")], layer_heads=heads,
                    layer_rows=rows, layer_window=[0, 4])
    rng = np.random.default_rng(0)
    before = {}
    for il in range(2):
        for part, (buf, t) in enumerate(zip(cache.layer(il), cache.kv_types(il))):
            data = rng.integers(0, 256, (n_seq, heads[il], rows[il], kv_row_bytes(t, head_dim)), np.uint8)
            cl.enqueue_copy(rt.queue, buf, data)
            before[il, part] = data
    cache.set_length(0, n + 1)
    cache.copy_prefix(0, 2, n)
    assert cache.lengths[2] == n
    for (il, part), data in before.items():
        got = np.empty_like(data)
        cl.enqueue_copy(rt.queue, got, cache.layer(il)[part])
        want = data.copy()
        count = n if rows[il] == n_ctx else rows[il]
        want[2, :, :count] = data[0, :, :count]
        np.testing.assert_array_equal(got, want, err_msg=f"layer {il} {'kv'[part]}")
