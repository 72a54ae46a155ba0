"""ngram-simple: the last size_n tokens are searched for in the history (most recent occurrence, never the
one at position 0); the draft is what followed, up to size_m tokens, and nothing unless at least size_n
tokens followed.

min_hits is unused, as in llama.cpp (only ngram-map-k4v reads it).
"""

from __future__ import annotations

from nextn.spec.ngram.base import NgramDrafter, NgramParams, _ChainIndex


class NgramSimpleDrafter(NgramDrafter):
    """ngram-simple: draft what followed the most recent earlier occurrence of the last size_n tokens."""

    name = "ngram-simple"

    def __init__(self, params: NgramParams):
        super().__init__()
        self.n = params.ngram_simple_size_n
        self.m = params.ngram_simple_size_m
        self.max_len = self.m
        self._occ = _ChainIndex(self.n)

    def _rebuild(self) -> None:
        self._occ.clear()
        self._occ.update(self._seq)

    def _index(self, start: int) -> None:
        self._occ.update(self._seq)

    def draft(self, n_max: int) -> list[int]:
        seq, n, m = self._seq, self.n, self.m
        cur_len = len(seq) - 1  # llama.cpp's history length; seq[-1] is its id_last
        if n_max <= 0 or cur_len <= n + m + 1:
            return []
        # The key itself starts at cur_len - n + 1; llama.cpp starts the search two positions earlier
        # and never matches position 0.
        pos = self._occ.latest(tuple(seq[-n:]), cur_len - n - 1)
        if pos < 1:
            return []
        n_copy = min(m, cur_len - (pos + n))
        if n_copy < n:  # llama.cpp wants at least size_n tokens after the match
            return []
        return seq[pos + n:pos + n + min(n_copy, n_max)]

