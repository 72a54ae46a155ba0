"""`draft-simple`: a separate small model (same vocabulary) drafts greedily for every slot.

The draft model keeps one KV sequence per slot. Before drafting, each slot's sequence is synced: what the
draft model holds is compared with the slot's tokens (prompt + generated), the common prefix is kept (a
KV cache truncates by length) and the rest is evaluated. Then the drafts of all drafting slots are made
together, one batched step per draft position. Drafts stay in the draft model's cache; the next sync keeps
the accepted ones and overwrites the rest.
"""

from __future__ import annotations

import time

import numpy as np

from nextn.errors import ConfigError
from nextn.memory.prompt_cache import common_prefix
from nextn.spec.drafter import BatchDrafter

TYPE = "draft-simple"

MAX_VOCAB_DIFF = 128  # as llama.cpp's common_speculative_are_compatible


def check_compatible(target, draft) -> None:
    """Refuse a draft model whose tokens would not mean the same as the target's."""
    tt, dt = target.file.meta.get("tokenizer.ggml.tokens", []), draft.file.meta.get("tokenizer.ggml.tokens", [])
    if abs(target.n_vocab - draft.n_vocab) > MAX_VOCAB_DIFF:
        raise ConfigError(f"draft model {draft.file.path.name}: vocabulary of {draft.n_vocab} tokens, the target "
                          f"{target.file.path.name} has {target.n_vocab} (they may differ by {MAX_VOCAB_DIFF} at most)")
    n = min(len(tt), len(dt))
    for i in range(n):
        if tt[i] != dt[i]:
            raise ConfigError(f"draft model {draft.file.path.name}: token {i} is {dt[i]!r}, the target's is "
                              f"{tt[i]!r}: the vocabularies differ")


class DraftModel(BatchDrafter):
    def __init__(self, runner, target=None, step_cost=None):
        if target is not None:
            check_compatible(target, runner)
        if runner.holds_recurrent_state:
            raise ConfigError(f"draft model {runner.file.path.name}: a model with recurrent layers cannot be a "
                              f"draft model yet (its state cannot be cut back to the accepted tokens)")
        self.runner = runner
        self.step_cost = step_cost  # what drafting costs counts against speculating (adaptive controllers)
        self.tokens: list[list[int]] = [[] for _ in range(runner.n_seq)]  # what each sequence holds

    def _sync(self, slot: int, seq_tokens: list[int]) -> int:
        """Make the draft sequence hold seq_tokens; returns the draft model's argmax after the last one."""
        held = self.tokens[slot]
        keep = min(common_prefix(held, seq_tokens), len(seq_tokens) - 1)  # recompute at least the last
        self.runner.truncate(slot, keep)
        keep = self.runner.seq_length(slot)  # less when a sliding-window ring could not keep that much
        top, _ = self.runner.eval(slot, seq_tokens[keep:], keep, want_logits=False)
        self.tokens[slot] = list(seq_tokens)
        return int(top[-1])

    def draft(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """wants: slot -> (its tokens so far, the last one not yet fed to the target; drafts wanted).
        Returns slot -> greedy drafts continuing those tokens."""
        out = {slot: [self._sync(slot, toks)] for slot, (toks, k) in wants.items() if k > 0}
        for i in range(1, max((k for _, k in wants.values()), default=0)):
            go = [s for s in out if wants[s][1] > i]
            if not go:
                break
            ids = [out[s][-1] for s in go]
            pos = np.asarray([len(self.tokens[s]) for s in go], np.int32)
            top, _ = self.runner.step(ids, pos, go, list(range(len(go))))
            for j, s in enumerate(go):
                self.tokens[s].append(ids[j])
                out[s].append(int(top[j]))
        return out

    def before_step(self, slots) -> None:
        """Drafts for every generating slot whose chain has draft-simple, into its held drafts."""
        by_index = {s.index: s for s in slots
                    if s.spec is not None and TYPE in s.spec.held and s.spec.k_next > 0}
        t0 = time.perf_counter()
        made = self.draft({i: (s.history, s.spec.k_next) for i, s in by_index.items()})
        if self.step_cost is not None:
            self.step_cost.observe_draft(sum(map(len, made.values())), time.perf_counter() - t0)
        for i, drafts in made.items():
            by_index[i].spec.held[TYPE].hold(drafts)
