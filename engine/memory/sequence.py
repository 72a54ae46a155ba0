"""What every model cache is to the runner: per-sequence state that the runner alone moves.

A cache holds, per sequence (slot), how many positions are valid (`lengths`), how many of them the MTP
block's own KV holds (`mtp_lengths`), and whatever the architecture keeps for them (K/V, recurrent state,
snapshots). Only the runner calls the methods that change them (engine/runner.py: after a step, on a
rollback, a truncation, a snapshot); everything else reads `lengths`.

The kinds differ in how far back they can go: a KV cache keeps any prefix (truncating is setting a
length), a recurrent state only the whole sequence, its snapshot or nothing. `seek` and `truncate` do what
the kind can and refuse the rest.
"""

from abc import ABC, abstractmethod


class SequenceCache(ABC):
    holds_recurrent_state = False  # True: positions cannot be cut back except to a snapshot or to 0

    def __init__(self, n_seq: int, n_ctx: int):
        self.n_seq, self.n_ctx = n_seq, n_ctx
        self.mtp_lengths = [0] * n_seq  # positions held in the MTP block's KV cache
        # attention's flash-decoding splits and their partials (ops/attention.py KvSplit), shared by the
        # layers; the runner sets it before building steps (None: attention never splits)
        self.kv_split = None

    @property
    @abstractmethod
    def lengths(self) -> list[int]:
        """Valid positions of each sequence."""

    @abstractmethod
    def layer(self, il: int):
        """(K, V) device buffers of attention layer il."""

    @abstractmethod
    def kv_types(self, il: int) -> tuple[str, str]:
        """(K, V) row types of attention layer il (ops/attention.py KV_TYPES)."""

    @property
    @abstractmethod
    def kv_layer_types(self) -> list[tuple[str, str]]:
        """(K, V) row types of every layer with a KV cache, in its order."""

    @abstractmethod
    def attention_read_bytes(self, n_past: int) -> int:
        """Bytes of K and V that attention reads for one token after n_past positions, every layer (a
        sliding-window layer reads its window only)."""

    @abstractmethod
    def set_length(self, seq: int, n: int) -> None:
        """The runner's record that seq now holds n positions (after a step wrote them, or a rollback)."""

    @abstractmethod
    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length (as far as the kind allows)."""

    @abstractmethod
    def seek(self, seq: int, pos: int) -> None:
        """Make seq continue at position pos, or raise ValueError when the kind cannot."""

    @abstractmethod
    def prefix_store(self):
        """The memory.prompt_cache.PrefixStore that reuses and copies this cache's prefixes."""

    def recurrent_bytes_per_seq(self) -> int:
        """Bytes of recurrent state one sequence reads and writes per step (0 for a KV-only cache)."""
        return 0

    def snapshot(self, seq: int) -> None:
        """Keep seq's state at its current length for a later seek back to it (a KV cache needs nothing:
        any prefix of it stays)."""

    def save_for_rollback(self, seq: int) -> None:
        """Before a step that verifies drafts of seq (a KV cache rolls back by its length alone)."""

    def restore_for_rollback(self, seq: int) -> None:
        """Back to what save_for_rollback kept."""
