"""Prompt cache: a new request reuses the longest prefix of its prompt already computed in some slot.

The decision (which slot, how many tokens to reuse, whether to copy from another slot) is made here from
token lists alone. What reuse means for the model's state sits behind `PrefixStore`:

- `reuse(seq, n) -> int`: keep the first n positions of `seq`, return how many really are kept. A KV cache
  keeps any n; a hybrid model's recurrent state can only restart at positions where it kept a snapshot,
  so it returns the largest snapshot position <= n (and the scheduler recomputes the rest).
- `copy_prefix(src, dst, n) -> int`: make `dst` start with the first n positions of `src`; returns the
  positions copied (same rounding rule). An MTP head's own cache is one more store in a `StoreChain`.

At least the last prompt token is always recomputed: its logits give the first generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PrefixStore(Protocol):
    def reuse(self, seq: int, n: int) -> int: ...

    def copy_prefix(self, src: int, dst: int, n: int) -> int: ...


class KVPrefixStore:
    """Attention KV cache: any prefix can be kept (truncate) or copied device-side."""

    def __init__(self, cache):
        self.cache = cache

    def reuse(self, seq: int, n: int) -> int:
        self.cache.truncate(seq, n)
        return self.cache.lengths[seq]

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        self.cache.copy_prefix(src, dst, n)
        return self.cache.lengths[dst]


class StoreChain:
    """Several stores that must agree (KV + recurrent snapshots + MTP cache): the smallest reuse wins."""

    def __init__(self, *stores: PrefixStore):
        self.stores = stores

    def reuse(self, seq: int, n: int) -> int:
        for s in self.stores:  # shrink until every store can keep the same prefix
            n = s.reuse(seq, n)
        for s in self.stores:
            n = min(n, s.reuse(seq, n))
        return n

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        for s in self.stores:
            n = min(n, s.copy_prefix(src, dst, n))
        return self.reuse(dst, n)


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Placement:
    slot: int
    reused: int  # prompt tokens whose state is kept (not recomputed)
    copied_from: int | None  # the slot the prefix was copied from, or None (own cache, or nothing)


class PromptCache:
    """Per-slot record of the tokens whose state is in the slot's sequence, and the reuse decision."""

    # copying costs a device copy of every layer; below this many tokens recomputing is as cheap
    MIN_COPY = 16

    def __init__(self, store: PrefixStore, n_slots: int):
        self.store = store
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.hits = 0  # requests that reused something
        self.reused_tokens = 0

    def place(self, prompt: list[int], free: list[int]) -> Placement:
        """Chooses a free slot for `prompt` and makes its state hold the reusable prefix."""
        limit = len(prompt) - 1  # recompute at least the last prompt token
        own = {s: min(common_prefix(self.tokens[s], prompt), limit) for s in free}
        # the free slot whose own cache matches best; ties go to the one with the least to lose
        slot = max(free, key=lambda s: (own[s], -len(self.tokens[s])))
        best_src, best = None, own[slot]
        for s, toks in enumerate(self.tokens):
            n = min(common_prefix(toks, prompt), limit)
            if n > best + self.MIN_COPY - 1 and s != slot:
                best_src, best = s, n
        if best_src is not None:
            # a busy source is safe: its positions < n are final and it only appends; the copy is queued
            # before the next step on the same in-order queue
            reused = self.store.copy_prefix(best_src, slot, best)
        else:
            reused = self.store.reuse(slot, own[slot])
        self.tokens[slot] = list(prompt[:reused])
        if reused:
            self.hits += 1
            self.reused_tokens += reused
        return Placement(slot, reused, best_src)

    def append(self, slot: int, tokens) -> None:
        """Tokens whose state the slot's sequence now holds (evaluated prompt chunks, fed-back tokens)."""
        self.tokens[slot].extend(tokens)

    def forget(self, slot: int) -> None:
        self.tokens[slot] = []
        self.store.reuse(slot, 0)
