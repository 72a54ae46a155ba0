"""KV cache of the attention layers: per layer one K and one V buffer holding every sequence (slot).

Layout per layer: [n_seq, n_head_kv, n_ctx] rows of head_dim values (head-major: the positions a kv head
walks are contiguous; kernels/kv_types.h KV_ROW), half precision or q8_0 / q4_0 blocks (KVTypes:
--cache-type-k/-v, and the MTP layer's own). A token of sequence s at position p is written at (s, g, p) for
each kv head g by the step's qkv_prep kernel; attention for a token at position p reads positions 0..p of its own
sequence. So the cache needs no host bookkeeping beyond how many positions of each sequence are valid:
truncating a sequence (rejected drafts, a prompt-cache reuse of a shorter prefix) is setting its length.

Layers may differ (step35): each its own kv head count (`layer_heads`) and, for a sliding-window layer, a
ring of `layer_rows[il]` < n_ctx rows per sequence (position p in row p % rows; ops/attention.py ring_rows)
that keeps the last positions a token can see (`layer_window[il]`). Positions older than the ring are gone,
so a ring cache keeps a shorter prefix (truncate, copy_prefix) only while the rows a token at its end sees
were not overwritten since; otherwise the sequence starts over from 0 (as llama.cpp's SWA cache does).
"""

from dataclasses import dataclass

import pyopencl as cl

from nextn.errors import ConfigError
from nextn.memory.sequence import SequenceCache
from nextn.ops.attention import kv_cache_bytes, kv_row_bytes


@dataclass(frozen=True)
class KVTypes:
    """Row types of the KV cache (ops/attention.py KV_TYPES): the model's layers, and the MTP block's layer
    (llama-server's --spec-draft-type-k/-v, which also set a draft model's)."""

    k: str = "f16"
    v: str = "f16"
    mtp_k: str = "f16"
    mtp_v: str = "f16"

    def check(self, head_dim: int, model: str) -> None:
        """Refuse a quantized type for heads that are not whole blocks of 32 (ggml refuses them too)."""
        for flag, t in (("--cache-type-k", self.k), ("--cache-type-v", self.v), ("--spec-draft-type-k", self.mtp_k),
                        ("--spec-draft-type-v", self.mtp_v)):
            if t != "f16" and head_dim % 32:
                raise ConfigError(f"{flag} {t}: {model} has heads of {head_dim} values, not a multiple of the "
                                  f"32 of a {t} block; use f16")

    def layers(self, n_layer: int, mtp: bool = False) -> list[tuple[str, str]]:
        """(k, v) of each KV layer: n_layer of the model's, then the MTP block's when mtp."""
        return [(self.k, self.v)] * n_layer + ([(self.mtp_k, self.mtp_v)] if mtp else [])


F16_KV = KVTypes()  # the default: every row in half precision


class KVCache(SequenceCache):
    def __init__(self, rt, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int, types: list[tuple[str, str]],
                 *, layer_heads: list[int] | None = None, layer_rows: list[int] | None = None,
                 layer_window: list[int] | None = None):
        """types: (k, v) row types of each layer (KVTypes.layers). layer_heads: kv heads of each layer (default
        n_head_kv); layer_rows: rows per sequence of each layer (default n_ctx; fewer: a sliding-window ring
        of a layer whose layer_window is > 0)."""
        super().__init__(n_seq, n_ctx)
        self.n_layer = len(types)
        self.n_head_kv, self.head_dim = n_head_kv, head_dim
        self.types = list(types)
        self.heads = list(layer_heads or [n_head_kv] * self.n_layer)
        self.rows = list(layer_rows or [n_ctx] * self.n_layer)
        self.window = list(layer_window or [0] * self.n_layer)
        self._queue = rt.queue
        self._layers = [
            tuple(rt.alloc(n_seq * self.rows[il] * self.heads[il] * kv_row_bytes(t, head_dim), f"kv.{il}.{part}")
                  for part, t in zip("kv", kv))
            for il, kv in enumerate(self.types)
        ]
        self._lengths = [0] * n_seq  # valid positions per sequence
        # per sequence, one past the highest position written since it last started from 0 (rejected drafts
        # included): a ring row of position j survives while j >= _written - rows
        self._written = [0] * n_seq
        self._rings = [(r, w) for r, w in zip(self.rows, self.window) if r < n_ctx]

    @staticmethod
    def bytes_needed(n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int, types: list[tuple[str, str]],
                     layer_heads: list[int] | None = None, layer_rows: list[int] | None = None) -> int:
        heads = layer_heads or [n_head_kv] * len(types)
        rows = layer_rows or [n_ctx] * len(types)
        return sum(kv_cache_bytes(n_seq, r, h, head_dim, k, v) for (k, v), h, r in zip(types, heads, rows))

    def layer_rows(self, il: int) -> int:
        """Rows per sequence of layer il (n_ctx, or fewer for a sliding-window ring)."""
        return self.rows[il]

    def _keeps(self, seq: int, n: int) -> bool:
        """Whether every ring still holds the rows a token at position n sees (n - window < j < n)."""
        return all(max(0, n - w + 1) >= self._written[seq] - r for r, w in self._rings)

    @property
    def lengths(self) -> list[int]:
        return self._lengths

    def layer(self, il: int):
        return self._layers[il]

    def kv_types(self, il: int) -> tuple[str, str]:
        """(K, V) row types of layer il."""
        return self.types[il]

    @property
    def kv_layer_types(self) -> list[tuple[str, str]]:
        return list(self.types)

    def attention_read_bytes(self, n_past: int) -> int:
        return sum(min(n_past, w or n_past) * h * (kv_row_bytes(k, self.head_dim) + kv_row_bytes(v, self.head_dim))
                   for h, w, (k, v) in zip(self.heads, self.window, self.types))

    def set_length(self, seq: int, n: int) -> None:
        self._lengths[seq] = n
        self._written[seq] = max(self._written[seq], n)

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of `seq` (they are overwritten when decoded again). A ring that no longer
        holds what position `length` sees forgets everything."""
        n = min(self._lengths[seq], length)
        if self._rings and n < self._lengths[seq] and not self._keeps(seq, n):
            n = 0
        if n == 0:
            self._written[seq] = 0
        self._lengths[seq] = n

    def seek(self, seq: int, pos: int) -> None:
        # any prefix of a KV cache is whole; positions from pos on are rewritten by the next step
        before = self._lengths[seq]
        self.truncate(seq, pos)
        if self._rings and pos < before and self._lengths[seq] != pos:
            raise ValueError(f"sequence {seq}: a sliding-window layer no longer holds what position {pos} sees "
                             f"(its ring has moved on); continue from 0")

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
        if self._rings and not self._keeps(src, n):
            self.truncate(dst, 0)
            return
        for il, (bufs, types) in enumerate(zip(self._layers, self.types)):
            heads = self.heads[il]
            for buf, t in zip(bufs, types):
                row = kv_row_bytes(t, self.head_dim)  # one position of one kv head of one layer's K (or V)
                head_bytes = self.rows[il] * row  # one kv head's rows of one sequence
                count = n if self.rows[il] == self.n_ctx else self.rows[il]  # a ring: all of it
                # the first `count` rows of each of src's kv heads: one rectangle of `heads` lines, head_bytes
                # apart (sequences src and dst are disjoint, as a rectangular copy within a buffer needs)
                cl.enqueue_copy(self._queue, buf, buf, src_origin=(0, src * heads, 0),
                                dst_origin=(0, dst * heads, 0), region=(count * row, heads, 1),
                                src_pitches=(head_bytes, 0), dst_pitches=(head_bytes, 0))
        self._lengths[dst] = n
        self._written[dst] = self._written[src] if self._rings else n
