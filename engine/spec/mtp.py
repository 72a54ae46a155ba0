"""`draft-mtp`: the model's own MTP (NextN) block drafts for every slot, after each step, on the device.

The block pairs the token at position p with the trunk's final hidden state at p - 1 (the zero state at
p = 0). After each trunk step it takes, for every sequence, the tokens the trunk just took (prompt chunks
too, so its own KV stays in step with the trunk's: "catch-up"), paired with their batch rows shifted by one
token; the last entry of a generating slot is its new token, whose draft logits give d1. d2.. come from
feeding each draft back with the block's own hidden output. All slots draft in the same batched steps.

With several MTP heads (step35's nextn_predict_layers > 1; runner.mtp_heads) they draft as llama.cpp's
chain_heads: every head catches up on the same pairs (each keeps its own KV), head 0 gives d1, and head i
gives d_{i+1} from the slot's drafts d1..d_i at their positions, each paired with the hidden output that
gave it (head t-1's for d_t), so at most mtp_heads drafts per step.

A greedy request takes the argmax (a point proposal); a sampled one draws from its own sampler chain over
the draft logits and keeps the distribution for exact rejection sampling. A draft less likely than the
slot's p_min ends that slot's drafting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from nextn.spec.drafter import Advance, BatchDrafter

TYPE = "draft-mtp"
ZERO_HIDDEN = -1  # runner.mtp_step's row for "no previous position"


@dataclass
class _Drafting:
    """One slot's drafts being made: tokens, their draft distributions (None: point proposals), its row in
    the last MTP batch (whose hidden output feeds the next draft), and whether it stopped."""

    row: int
    tokens: list = field(default_factory=list)
    hidden: list = field(default_factory=list)  # chained heads: the "mtp" row that gave each draft
    probs: list = field(default_factory=list)
    done: bool = False

    def take(self, s, top: int, logits) -> None:
        """Append a draft for slot s: the argmax for greedy requests, else a draw from the request's sampler
        chain over the draft logits, kept with its distribution. Below the slot's p_min: drafting ends."""
        if logits is None:
            self.tokens.append(top)
            self.probs.append(None)
            return
        if s.req.params.greedy:
            z = logits.astype(np.float64)
            e = np.exp(z - z.max())
            token, q, conf = top, None, float(e[top] / e.sum())
        else:
            try:
                q = s.sampler.probs(logits, [*s.history, *self.tokens])
            except ValueError:  # this request's draft logits are unusable: it drafts nothing, the others go on
                self.done = True
                return
            token = int(s.sampler.rng.choice(len(q), p=q))
            conf = float(q[token])
        if conf < s.spec.p_min:
            self.done = True
            return
        self.tokens.append(token)
        self.probs.append(q)


class MtpDrafter(BatchDrafter):
    def __init__(self, runner, step_cost):
        self.runner = runner
        self.step_cost = step_cost  # what drafting costs counts against speculating (adaptive controllers)

    def after_step(self, advances: list[Advance], slots) -> None:
        r = self.runner
        heads = r.mtp_heads
        t0 = time.perf_counter()
        entries = []  # (slot, token, position, hidden row of the trunk batch)
        for a in advances:
            if a.start == 0:
                entries.append((a.slot, a.tokens[0], 0, ZERO_HIDDEN))
            nxt = [] if a.next_token is None else [a.next_token]
            for i, t in enumerate([*a.tokens[1:], *nxt]):
                entries.append((a.slot, t, a.start + i + 1, a.row + i))
        drafting = {s.index: s for s, _, _, _ in entries
                    if s.req is not None and not s.prefilling and s.spec is not None
                    and TYPE in s.spec.cfg.types and s.spec.k_next > 0}
        # drafting slots last (each slot's entries stay in order): their last entries, whose hidden outputs
        # feed the next drafts, are then in the last chunk, which no later chunk overwrites
        entries.sort(key=lambda e: e[0].index in drafting)
        for s in drafting.values():
            s.spec.held[TYPE].hold([], [])
        last_row = {}
        for i, (s, _, _, _) in enumerate(entries):
            last_row[s.index] = i
        # catch-up, in chunks of the batch size; d1 of each drafting slot from its last entry
        state: dict[int, _Drafting] = {}
        for c0 in range(0, len(entries), r.n_batch):
            part = entries[c0 : c0 + r.n_batch]
            want = [i for i, (s, _, _, _) in enumerate(part) if s.index in drafting and last_row[s.index] == c0 + i]
            args = ([e[1] for e in part], np.asarray([e[2] for e in part], np.int32), [e[0].index for e in part],
                    [e[3] for e in part])
            for head in range(1, heads):  # chained heads keep their own KV in step
                r.mtp_step(*args, [], head=head)
            top, lg = r.mtp_step(*args, want, want_logits=self._want_logits(drafting.values()))
            for j, i in enumerate(want):
                s = part[i][0]
                state[s.index] = _Drafting(row=i, hidden=[r.mtp_hidden_row(0, i)])
                state[s.index].take(s, int(top[j]), None if lg is None else lg[j])
        t1 = time.perf_counter()
        self.step_cost.observe_draft_pass(t1 - t0)  # paid at every step, drafting or not
        if heads > 1:
            self._chain(drafting, state, heads)
            heads = 0  # no single-head drafting below
        # further drafts: each slot's last draft with the block's own hidden output of its row
        for _ in range(1, max((s.spec.k_next for s in drafting.values()), default=0) if heads else 0):
            go = [s for s in drafting.values() if not state[s.index].done and len(state[s.index].tokens) < s.spec.k_next]
            if not go:
                break
            pos = np.asarray([s.n_past + len(state[s.index].tokens) for s in go], np.int32)
            top, lg = r.mtp_step([state[s.index].tokens[-1] for s in go], pos, [s.index for s in go],
                                 [state[s.index].row for s in go], list(range(len(go))), source="mtp",
                                 want_logits=self._want_logits(go))
            for j, s in enumerate(go):
                state[s.index].row = j
                state[s.index].take(s, int(top[j]), None if lg is None else lg[j])
        for idx, st in state.items():
            drafting[idx].spec.held[TYPE].hold(st.tokens, st.probs)
        # the drafts after each slot's first, one block step at a time
        self.step_cost.observe_draft(sum(max(0, len(st.tokens) - 1) for st in state.values()),
                                     time.perf_counter() - t1)

    def _chain(self, drafting: dict, state: dict, heads: int) -> None:
        """Drafts 2.. of chained heads: head i over each slot's d1..d_i at positions n_past+1.., d_t paired
        with the hidden output that gave it; the last row's logits give d_{i+1}."""
        r = self.runner
        for i in range(1, heads):
            go = [s for s in drafting.values() if not state[s.index].done and len(state[s.index].tokens) == i
                  and i < s.spec.k_next]
            if not go:
                break
            ids, pos, seq, hid, out = [], [], [], [], []
            for s in go:
                st = state[s.index]
                for t in range(i):
                    ids.append(st.tokens[t])
                    pos.append(s.n_past + t + 1)
                    seq.append(s.index)
                    hid.append(st.hidden[t])
                out.append(len(ids) - 1)
            top, lg = r.mtp_step(ids, np.asarray(pos, np.int32), seq, hid, out, source="mtp",
                                 want_logits=self._want_logits(go), head=i)
            for j, s in enumerate(go):
                st = state[s.index]
                st.hidden.append(r.mtp_hidden_row(i, out[j]))
                st.take(s, int(top[j]), None if lg is None else lg[j])

    @staticmethod
    def _want_logits(slots) -> bool:
        return any(not s.req.params.greedy or s.spec.p_min > 0 for s in slots)
