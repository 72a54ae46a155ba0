"""The two shapes of a drafter.

- `Drafter`: one slot's source of drafts, asked before each step (`propose`). The n-gram drafters compute
  theirs from the slot's tokens on the host; `HeldDrafts` holds what a device drafter made for the slot.
- `BatchDrafter`: a drafter that runs on the device for all slots at once - the MTP head (spec/mtp.py) after
  each step, the draft model (spec/draft_model.py) before it - and hands each slot its drafts through the
  slot's `HeldDrafts`.

The speculator (spec/speculator.py) chains a slot's drafters in --spec-type order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Drafter:
    """One slot's drafter. reset/extend follow the slot's tokens; feedback tells how a proposal fared."""

    def reset(self, prompt: Sequence[int]) -> None:
        """A new request starts with this prompt."""

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens appended to the slot's sequence (emitted ones)."""

    def propose(self, k: int) -> tuple[list[int], list[np.ndarray | None] | None]:
        """Up to k drafts, and their draft distributions (None: point proposals)."""
        raise NotImplementedError

    def feedback(self, n_drafted: int, n_accepted: int) -> None:
        """How many of this drafter's last proposal were accepted."""


class HeldDrafts(Drafter):
    """Drafts a BatchDrafter made for this slot, proposed until it makes new ones."""

    def __init__(self):
        self.tokens: list[int] = []
        self.probs: list[np.ndarray | None] = []

    def hold(self, tokens: list[int], probs: list[np.ndarray | None] | None = None) -> None:
        self.tokens = tokens
        self.probs = probs if probs is not None else [None] * len(tokens)

    def propose(self, k: int):
        q = self.probs[:k]
        return self.tokens[:k], (q if any(p is not None for p in q) else None)


@dataclass
class Advance:
    """What one slot's sequence took in the last step: `tokens` at positions start.. from batch row `row`
    on, and the token it will take next (the next prompt token or the one just emitted; None when the
    request has ended)."""

    slot: object  # the scheduler's slot
    start: int
    row: int
    tokens: list[int]
    next_token: int | None


class BatchDrafter:
    """A drafter on the device for all slots. The scheduler calls before_step with the generating slots
    before it builds a batch, and after_step with what each slot's sequence took."""

    def before_step(self, slots) -> None:
        pass

    def after_step(self, advances: list[Advance], slots) -> None:
        pass
