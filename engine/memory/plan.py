"""What a loaded model will hold on the device, computed before anything is allocated."""

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # the trunk's weights (the MTP block's are counted apart)
    kv_cache: int  # attention layers, every sequence
    activations: int  # step buffers of the largest batch
    recurrent_state: int = 0  # conv + delta-rule state of linear-attention layers, every sequence
    snapshots: int = 0  # one saved recurrent state per sequence (prompt cache)
    rollback: int = 0  # speculation on recurrent layers: a state copy per sequence + saved kernel inputs
    mtp_weights: int = 0  # the MTP (nextn) block, only when loaded
    mtp_kv_cache: int = 0
    mtp_activations: int = 0
    attention_splits: int = 0  # partial results of attention split over the KV (ops/attention.py KvSplit)
    matmul_scratch: int = 0  # x's block sums of a prompt step (ops/matmul.py xsum_scratch_bytes)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def items(self) -> list[tuple[str, int]]:
        """(part, bytes) of the parts this model has, in field order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) or f.name in ("weights", "kv_cache", "activations")]
