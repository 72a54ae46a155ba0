"""ngram-mod: a hash table of 4M entries maps the hash of every n_match-gram to the token that followed it
(collisions overwrite). The draft chains lookups: at least n_min and at most n_max tokens, else nothing.
The table outlives requests; it is cleared when reset() finds it over 25 % full, and after 5 drafts in a
row with an acceptance fraction under 0.25 (then the current sequence is indexed again).

Where this differs from llama.cpp, on purpose: n-grams are added to the table in extend(); llama.cpp adds
them in chunks of 32 at draft time, a speed measure, so here the newest n-grams are usable at once. The
feedback fraction uses the number of tokens actually verified (llama.cpp divides by the untruncated draft
length).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from nextn.spec.ngram.base import NgramDrafter, NgramParams, _check_feedback, _ints

log = logging.getLogger(__name__)

# ngram-mod's hash: llama.cpp's `res = res * 6364136223846793005 + token` over the n-gram, in uint64, then
# `% size`. The size is 2^22, so only the low 22 bits matter and the polynomial can be evaluated mod 2^22,
# which keeps Python's integers small and lets the hash roll from one window to the next.
_MOD_SIZE = 4 * 1024 * 1024
_MOD_MASK = _MOD_SIZE - 1
_MOD_MUL = 6364136223846793005 & _MOD_MASK
_MOD_OCCUPANCY_RESET = 0.25  # reset() clears a table fuller than this (llama.cpp's f_thold)
_MOD_LOW_ACCEPT = 0.25  # a draft with a smaller accepted fraction counts as a miss
_MOD_LOW_STREAK = 5  # this many misses in a row clear the table
_VECTOR_MIN = 256  # index this many n-grams or more with numpy, fewer with a Python loop


class NgramModTable:
    """ngram-mod's table: hash of an n-gram -> the token that followed it last (-1 = empty). llama.cpp keeps
    one for all slots; pass the same NgramShared to every slot's drafter to do the same."""

    def __init__(self, n: int):
        self.n = n
        self.entries = np.full(_MOD_SIZE, -1, dtype=np.int32)
        self.used = 0
        self._mul_out = pow(_MOD_MUL, n - 1, _MOD_SIZE)  # weight of the token leaving the window

    def clear(self) -> None:
        self.entries.fill(-1)
        self.used = 0

    def occupancy(self) -> float:
        return self.used / _MOD_SIZE

    def hash(self, tokens: Sequence[int]) -> int:
        h = 0
        for t in tokens:
            h = (h * _MOD_MUL + t) & _MOD_MASK
        return h

    def roll(self, h: int, t_out: int, t_in: int) -> int:
        """Hash of the window shifted by one token: t_out leaves at the front, t_in enters at the back."""
        return ((h - t_out * self._mul_out) * _MOD_MUL + t_in) & _MOD_MASK

    def add(self, seq: list[int], start: int, stop: int) -> None:
        """entries[hash(seq[i:i+n])] = seq[i+n] for i in [start, stop), in order (later ones win)."""
        if stop <= start:
            return
        if stop - start >= _VECTOR_MIN:
            self._add_vector(seq, start, stop)
            return
        n, entries, mul, mul_out = self.n, self.entries, _MOD_MUL, self._mul_out
        h = self.hash(seq[start:start + n])
        used = 0
        for i in range(start, stop):
            if i > start:
                h = ((h - seq[i - 1] * mul_out) * mul + seq[i + n - 1]) & _MOD_MASK
            if entries[h] < 0:
                used += 1
            entries[h] = seq[i + n]
        self.used += used

    def _add_vector(self, seq: list[int], start: int, stop: int) -> None:
        n, count = self.n, stop - start
        t = np.asarray(seq[start:stop + n], dtype=np.int64)
        h = np.zeros(count, dtype=np.int64)
        for k in range(n):  # products stay below 2^44: no overflow in int64
            h = (h * _MOD_MUL + t[k:k + count]) & _MOD_MASK
        # numpy leaves the winner of repeated fancy-index writes unspecified: keep each hash's last write.
        h_rev = h[::-1]
        slots, first = np.unique(h_rev, return_index=True)
        nxt = t[n:n + count][::-1][first].astype(np.int32)
        self.used += int(np.count_nonzero(self.entries[slots] < 0))
        self.entries[slots] = nxt


class NgramModDrafter(NgramDrafter):
    """ngram-mod: chain lookups in a hash table of n_match-grams -> next token."""

    name = "ngram-mod"

    def __init__(self, params: NgramParams, table: NgramModTable | None = None):
        super().__init__()
        self.n = params.ngram_mod_n_match
        self.n_max = params.ngram_mod_n_max
        self.n_min = params.ngram_mod_n_min
        self.max_len = self.n_max
        if table is not None and table.n != self.n:
            raise ValueError(f"ngram-mod table hashes {table.n}-grams, params want {self.n}")
        self.table = table if table is not None else NgramModTable(self.n)
        self._n_added = 0  # n-grams of self._seq added to the table: starts [0, _n_added)
        self._drafted = False
        self._n_low = 0  # drafts in a row with a low accepted fraction; survives reset(), as in llama.cpp

    def reset(self, tokens: Sequence[int]) -> None:
        self._seq = _ints(tokens)
        self._n_added = 0
        self._drafted = False
        self._index(0)
        if len(self._seq) >= self.n and self.table.occupancy() > _MOD_OCCUPANCY_RESET:
            log.info("ngram-mod table %.0f%% full: clearing it", 100 * self.table.occupancy())
            self.table.clear()

    def _index(self, start: int) -> None:
        # An n-gram is added once the token after it is known: starts i with i + n < len(seq).
        stop = len(self._seq) - self.n
        if stop > self._n_added:
            self.table.add(self._seq, self._n_added, stop)
            self._n_added = stop

    def draft(self, n_max: int) -> list[int]:
        self._drafted = False
        seq, n = self._seq, self.n
        if n_max <= 0 or len(seq) - 1 < n:
            return []
        # llama.cpp chains up to its n_max then the caller truncates to the slot's n_max; going past the
        # slot's n_max only matters to tell whether the chain reaches n_min.
        want = min(self.n_max, max(n_max, self.n_min))
        table = self.table
        entries = table.entries
        window = seq[-n:]
        h = table.hash(window)
        out: list[int] = []
        for i in range(want):
            tok = int(entries[h])
            if tok < 0:
                if i < self.n_min:
                    return []
                break
            out.append(tok)
            window.append(tok)
            h = table.roll(h, window[i], tok)
        out = out[:n_max]
        self._drafted = bool(out)
        return out

    def feedback(self, n_drafted: int, n_accepted: int) -> None:
        _check_feedback(n_drafted, n_accepted)
        if not self._drafted or n_drafted == 0:
            return
        self._drafted = False
        if n_accepted / n_drafted < _MOD_LOW_ACCEPT:
            self._n_low += 1
            if self._n_low >= _MOD_LOW_STREAK:
                # The table no longer predicts this text: start again from the current sequence only.
                log.debug("ngram-mod: %d low-acceptance drafts in a row, clearing the table", self._n_low)
                self.table.clear()
                self._n_low = 0
                self._n_added = 0
                self._index(0)
        else:
            self._n_low = 0
