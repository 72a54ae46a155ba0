"""KV cache of the attention layers: per layer one K and one V buffer holding every sequence (slot).

Layout per layer: half [n_seq, n_ctx, n_head_kv, head_dim]. A token of sequence s at position p is written
at (s, p) by the kv_store kernel; attention for a token at position p reads positions 0..p of its own
sequence. So the cache needs no host bookkeeping beyond how many positions of each sequence are valid:
truncating a sequence (rejected drafts, a prompt-cache reuse of a shorter prefix) is setting its length.
"""

from nextn.ops.attention import kv_cache_bytes


class KVCache:
    def __init__(self, rt, n_layer: int, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int):
        self.n_layer, self.n_seq, self.n_ctx = n_layer, n_seq, n_ctx
        self.n_head_kv, self.head_dim = n_head_kv, head_dim
        per_layer = kv_cache_bytes(n_seq, n_ctx, n_head_kv, head_dim) // 2
        self._layers = [
            (rt.alloc(per_layer, f"kv.{il}.k"), rt.alloc(per_layer, f"kv.{il}.v")) for il in range(n_layer)
        ]
        self.lengths = [0] * n_seq  # valid positions per sequence

    @staticmethod
    def bytes_needed(n_layer: int, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int) -> int:
        return n_layer * kv_cache_bytes(n_seq, n_ctx, n_head_kv, head_dim)

    def layer(self, il: int):
        return self._layers[il]

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of `seq` (they are overwritten when decoded again)."""
        self.lengths[seq] = min(self.lengths[seq], length)
