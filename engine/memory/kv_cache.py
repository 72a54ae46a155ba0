"""KV cache of the attention layers: per layer one K and one V buffer holding every sequence (slot).

Layout per layer: half [n_seq, n_ctx, n_head_kv, head_dim]. A token of sequence s at position p is written
at (s, p) by the kv_store kernel; attention for a token at position p reads positions 0..p of its own
sequence. So the cache needs no host bookkeeping beyond how many positions of each sequence are valid:
truncating a sequence (rejected drafts, a prompt-cache reuse of a shorter prefix) is setting its length.
"""

import pyopencl as cl

from nextn.memory.sequence import SequenceCache
from nextn.ops.attention import kv_cache_bytes


class KVCache(SequenceCache):
    def __init__(self, rt, n_layer: int, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int):
        super().__init__(n_seq, n_ctx)
        self.n_layer = n_layer
        self.n_head_kv, self.head_dim = n_head_kv, head_dim
        self._queue = rt.queue
        per_layer = kv_cache_bytes(n_seq, n_ctx, n_head_kv, head_dim) // 2
        self._layers = [
            (rt.alloc(per_layer, f"kv.{il}.k"), rt.alloc(per_layer, f"kv.{il}.v")) for il in range(n_layer)
        ]
        self._lengths = [0] * n_seq  # valid positions per sequence

    @staticmethod
    def bytes_needed(n_layer: int, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int) -> int:
        return n_layer * kv_cache_bytes(n_seq, n_ctx, n_head_kv, head_dim)

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    @property
    def n_kv_layers(self) -> int:
        return self.n_layer

    def layer(self, il: int):
        return self._layers[il]

    def set_length(self, seq: int, n: int) -> None:
        self._lengths[seq] = n

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of `seq` (they are overwritten when decoded again)."""
        self._lengths[seq] = min(self._lengths[seq], length)

    def seek(self, seq: int, pos: int) -> None:
        # any prefix of a KV cache is whole; positions from pos on are rewritten by the next step
        self.truncate(seq, pos)

    def prefix_store(self):
        from nextn.memory.prompt_cache import KVPrefixStore

        return KVPrefixStore(self)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions 0..n-1 of sequence `src` into sequence `dst` on the device (a prompt-cache hit taken
        from another slot). Buffer-to-buffer copies on the runner's in-order queue, so they land before the
        next step reads `dst`, and `src` positions < n are never rewritten while src only appends."""
        if src == dst:
            self.truncate(dst, n)
            return
        if n <= 0:
            self._lengths[dst] = 0
            return
        n = min(n, self.lengths[src])
        row = self.n_head_kv * self.head_dim * 2  # one position of one layer's K (or V), half precision
        seq_bytes = self.n_ctx * row
        for k_buf, v_buf in self._layers:
            for buf in (k_buf, v_buf):
                cl.enqueue_copy(self._queue, buf, buf, byte_count=n * row,
                                src_offset=src * seq_bytes, dst_offset=dst * seq_bytes)
        self._lengths[dst] = n
