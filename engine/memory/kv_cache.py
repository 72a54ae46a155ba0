"""KV cache of the attention layers: per layer one K and one V buffer holding every sequence (slot).

Layout per layer: [n_seq, n_ctx, n_head_kv] rows of head_dim values, half precision or q8_0 / q4_0 blocks
(KVTypes: --cache-type-k/-v, and the MTP layer's own). A token of sequence s at position p is written at
(s, p) by the step's qkv_prep kernel; attention for a token at position p reads positions 0..p of its own
sequence. So the cache needs no host bookkeeping beyond how many positions of each sequence are valid:
truncating a sequence (rejected drafts, a prompt-cache reuse of a shorter prefix) is setting its length.
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
    def __init__(self, rt, n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int, types: list[tuple[str, str]]):
        """types: (k, v) row types of each layer (KVTypes.layers)."""
        super().__init__(n_seq, n_ctx)
        self.n_layer = len(types)
        self.n_head_kv, self.head_dim = n_head_kv, head_dim
        self.types = list(types)
        self._queue = rt.queue
        self._layers = [
            tuple(rt.alloc(n_seq * n_ctx * n_head_kv * kv_row_bytes(t, head_dim), f"kv.{il}.{part}")
                  for part, t in zip("kv", kv))
            for il, kv in enumerate(self.types)
        ]
        self._lengths = [0] * n_seq  # valid positions per sequence

    @staticmethod
    def bytes_needed(n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int, types: list[tuple[str, str]]) -> int:
        return sum(kv_cache_bytes(n_seq, n_ctx, n_head_kv, head_dim, k, v) for k, v in types)

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
        for bufs, types in zip(self._layers, self.types):
            for buf, t in zip(bufs, types):
                row = self.n_head_kv * kv_row_bytes(t, self.head_dim)  # one position of one layer's K (or V)
                seq_bytes = self.n_ctx * row
                cl.enqueue_copy(self._queue, buf, buf, byte_count=n * row,
                                src_offset=src * seq_bytes, dst_offset=dst * seq_bytes)
        self._lengths[dst] = n
