"""The cache of a hybrid model (qwen35, qwen35moe): attention KV + the recurrent state of linear layers.

Per sequence (slot):
- K/V of every full-attention layer, and of the MTP block when it is loaded (a KVCache over those layers);
- conv state [d_conv - 1, conv_dim] and delta-rule state [n_v_heads, head_k_dim, head_v_dim] of every linear
  (Gated DeltaNet) layer, float32, in one buffer per layer holding all sequences;
- one snapshot of its recurrent states and the position it was taken at.

Unlike K/V, a recurrent state cannot be cut back to an earlier position: it holds the whole prefix folded in.
So a sequence can continue from its current length, from its snapshot, or from 0 (zeroed state); `seek`
does whichever the position asks for and refuses anything else.
"""

import numpy as np
import pyopencl as cl

from nextn.memory.kv_cache import F16_KV, KVCache, KVTypes
from nextn.memory.sequence import SequenceCache
from nextn.ops import delta_net as dn


class HybridCache(SequenceCache):
    holds_recurrent_state = True

    def __init__(self, rt, hp, n_seq: int, n_ctx: int, mtp: bool = False, rollback_rows: int = 0,
                 kv_types: KVTypes = F16_KV):
        super().__init__(n_seq, n_ctx)
        self.rt = rt
        self.attn_layers = hp.attention_layers(mtp)
        self.kv = KVCache(rt, n_seq, n_ctx, hp.n_head_kv, hp.head_dim,
                          kv_types.layers(len(hp.attention_layers(False)), mtp))
        self._kv_index = {il: i for i, il in enumerate(self.attn_layers)}
        conv_seq = dn.conv_state_bytes(1, hp.conv_dim, hp.d_conv)
        delta_seq = dn.delta_state_bytes(1, hp.n_v_heads, hp.head_k_dim, hp.head_v_dim)
        self.conv, self.delta, per_seq = {}, {}, []
        for il in hp.linear_layers():
            self.conv[il] = rt.alloc(n_seq * conv_seq, f"state.{il}.conv")
            self.delta[il] = rt.alloc(n_seq * delta_seq, f"state.{il}.delta")
            per_seq += [(self.conv[il], conv_seq), (self.delta[il], delta_seq)]
        self._per_seq = per_seq  # (state buffer, bytes per sequence) in snapshot order
        self._state_bytes = conv_seq + delta_seq
        snap_bytes = dn.snapshot_bytes(per_seq)
        self._snaps = [rt.alloc(max(snap_bytes, 4), f"state.snapshot.{s}") for s in range(n_seq)]
        self.snapshot_pos: list[int | None] = [None] * n_seq
        # Speculative rollback: the state of each sequence before its verify step, and the inputs of the
        # recurrent kernels (pre-conv q|k|v, alpha, beta) of the first rollback_rows rows of a step, per
        # layer. Rolling back to "after row r" = restore the saved state, replay rows up to r through the
        # conv and delta rule alone (no matmul: the whole batch is not recomputed).
        self.rollback_rows = rollback_rows
        self.saved = {}
        self._spec_snaps = []
        if rollback_rows:
            self._spec_snaps = [rt.alloc(max(snap_bytes, 4), f"state.spec_snapshot.{s}") for s in range(n_seq)]
            for il in hp.linear_layers():
                self.saved[il] = tuple(rt.alloc(4 * rollback_rows * width, f"state.{il}.saved_{name}")
                                       for name, width in (("qkv", hp.conv_dim), ("alpha", hp.n_v_heads),
                                                           ("beta", hp.n_v_heads)))
        for s in range(n_seq):
            self.reset(s)

    @staticmethod
    def bytes_needed(hp, n_seq: int, n_ctx: int, mtp: bool = False, rollback_rows: int = 0,
                     kv_types: KVTypes = F16_KV) -> dict[str, int]:
        """Device bytes by part: kv_cache (trunk), mtp_kv_cache, recurrent_state, snapshots, rollback."""
        n_attn = len(hp.attention_layers(False))
        kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(n_attn))
        mtp_kv = KVCache.bytes_needed(n_seq, n_ctx, hp.n_head_kv, hp.head_dim, kv_types.layers(0, True))
        n_lin = len(hp.linear_layers())
        state = n_lin * dn.state_bytes(n_seq, hp.conv_dim, hp.d_conv, hp.n_v_heads, hp.head_k_dim, hp.head_v_dim)
        return {
            "kv_cache": kv,
            "mtp_kv_cache": mtp_kv if mtp else 0,
            "recurrent_state": state,
            "snapshots": state,
            "rollback": (state + n_lin * 4 * rollback_rows * (hp.conv_dim + 2 * hp.n_v_heads)) if rollback_rows else 0,
        }

    @property
    def lengths(self) -> list[int]:
        """Positions of each sequence held by the trunk (KV and recurrent state agree on it)."""
        return self.kv.lengths

    def recurrent_bytes_per_seq(self) -> int:
        return len(self.conv) * self._state_bytes

    def layer(self, il: int):
        """(K, V) buffers of full-attention layer il (il = n_layer: the MTP block)."""
        return self.kv.layer(self._kv_index[il])

    def kv_types(self, il: int) -> tuple[str, str]:
        return self.kv.kv_types(self._kv_index[il])

    @property
    def kv_layer_types(self) -> list[tuple[str, str]]:
        return self.kv.kv_layer_types

    def attention_read_bytes(self, n_past: int) -> int:
        return self.kv.attention_read_bytes(n_past)

    def set_length(self, seq: int, n: int) -> None:
        self.kv.set_length(seq, n)

    def prefix_store(self) -> "HybridPrefixStore":
        return HybridPrefixStore(self)

    # -- positions --------------------------------------------------------------------------------------

    def reset(self, seq: int) -> None:
        """Sequence seq back to empty: zero recurrent state, no positions."""
        zero = np.zeros(1, np.float32)
        for buf, per_seq in self._per_seq:
            cl.enqueue_fill_buffer(self.rt.queue, buf, zero, seq * per_seq, per_seq)
        self.kv.set_length(seq, 0)
        self.mtp_lengths[seq] = 0
        self.snapshot_pos[seq] = None  # it held a prefix of what the sequence is about to forget

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length: keeping everything, or going back to the snapshot, or to empty."""
        if length < self.kv.lengths[seq]:
            self.seek(seq, length)

    def seek(self, seq: int, pos: int) -> None:
        """Make seq continue at position pos: its current length, its snapshot's position, or 0."""
        if pos == self.kv.lengths[seq]:
            return
        if pos == 0:
            self.reset(seq)
        elif pos == self.snapshot_pos[seq]:
            self.restore(seq)
        else:
            raise ValueError(
                f"sequence {seq} holds {self.kv.lengths[seq]} positions (snapshot at {self.snapshot_pos[seq]}): "
                f"a recurrent state cannot continue from position {pos}"
            )

    def snapshot(self, seq: int) -> None:
        """Save seq's recurrent state at its current length (a device copy, queued in order)."""
        if self._per_seq:
            dn.snapshot(self.rt, self._per_seq, seq, self._snaps[seq])
        self.snapshot_pos[seq] = self.kv.lengths[seq]

    def restore(self, seq: int) -> None:
        """Back to the snapshot: recurrent state restored, KV positions past it dropped."""
        pos = self.snapshot_pos[seq]
        if pos is None:
            raise ValueError(f"sequence {seq} has no snapshot")
        if self._per_seq:
            dn.restore(self.rt, self._per_seq, seq, self._snaps[seq])
        self.kv.truncate(seq, pos)
        self.mtp_lengths[seq] = min(self.mtp_lengths[seq], pos)

    def save_for_rollback(self, seq: int) -> None:
        """Before a verify step: keep seq's recurrent state (device copy, in queue order)."""
        if self._per_seq:
            dn.snapshot(self.rt, self._per_seq, seq, self._spec_snaps[seq])

    def restore_for_rollback(self, seq: int) -> None:
        if self._per_seq:
            dn.restore(self.rt, self._per_seq, seq, self._spec_snaps[seq])

    def copy_sequence(self, src: int, dst: int) -> None:
        """dst becomes a copy of src: KV prefix and recurrent state (device copies)."""
        if src == dst:
            return
        q = self.rt.queue
        for buf, per_seq in self._per_seq:
            cl.enqueue_copy(q, buf, buf, byte_count=per_seq, src_offset=src * per_seq, dst_offset=dst * per_seq)
        self.kv.copy_prefix(src, dst, self.kv.lengths[src])
        self.mtp_lengths[dst] = min(self.mtp_lengths[src], self.kv.lengths[dst])
        self.snapshot_pos[dst] = None


class HybridPrefixStore:
    """PrefixStore of a hybrid cache: a prefix is kept only where the recurrent state exists for it - the
    whole cached sequence, or its snapshot; otherwise the sequence restarts from 0."""

    def __init__(self, cache: HybridCache):
        self.cache = cache

    def reuse(self, seq: int, n: int) -> int:
        c = self.cache
        length = c.lengths[seq]
        if n >= length:
            return length
        snap = c.snapshot_pos[seq]
        c.seek(seq, snap if snap is not None and snap <= n else 0)
        return c.lengths[seq]

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        c = self.cache
        if src != dst and 0 < c.lengths[src] <= n:
            c.copy_sequence(src, dst)
            return c.lengths[dst]
        return self.reuse(dst, n if src == dst else 0)
