"""ngram-map-k and ngram-map-k4v: n-gram lookup with per-key statistics that adapt the draft.

- ngram-map-k: same lookup as ngram-simple, but the draft length adapts per key n-gram: after a draft from
  a key, the next draft from that key is at most as long as the number of tokens the verifier accepted last
  time (a key whose draft was fully rejected stops drafting, as in llama.cpp).
- ngram-map-k4v: per key n-gram, the distinct size_m-token continuations of its occurrences are counted
  (the first 4 distinct ones, hence "4v"); the most frequent one is drafted when it occurs at least twice
  as often as all the others together and the key was looked up at least min_hits times. The draft
  length adapts per (key, value) as in ngram-map-k.

Where this differs from llama.cpp, on purpose:
- Keys are looked up with an exact index (most recent occurrence with size_m tokens after it); llama.cpp
  uses a 2^18-entry hash keeping the first index inserted, which misses keys on collisions.
- k4v counts each occurrence once (llama.cpp recounts the match position at each lookup) and drafts the
  most frequent continuation itself (llama.cpp drafts the tokens after the matched occurrence even when
  the statistics chose another continuation).
- min_hits is unused by ngram-map-k, as in llama.cpp (only ngram-map-k4v reads it).
"""

from __future__ import annotations

from nextn.spec.ngram.base import NgramDrafter, NgramParams, _ChainIndex, _check_feedback

_MAX_COUNT = 16380  # llama.cpp's cap on key and value counters (they are uint16_t there)
_MAX_VALUES = 4  # continuations tracked per key n-gram (the "4v" of ngram-map-k4v)


class _Value:
    """A continuation m-gram of a key, how often it followed the key, and how many of its tokens the
    verifier accepted the last time it was drafted (the next draft from it is no longer than that)."""

    __slots__ = ("count", "n_accepted", "tokens")

    def __init__(self, tokens: list[int], n_accepted: int):
        self.tokens = tokens
        self.count = 0
        self.n_accepted = n_accepted


class _Key:
    __slots__ = ("hits", "stat_pos", "values")

    def __init__(self, m: int, key_only: bool):
        self.hits = 0  # lookups that found this key (llama.cpp's key_num)
        self.stat_pos = -1  # last occurrence already counted into values
        # ngram-map-k keeps one value and reads only its n_accepted; k4v fills values as they are counted.
        self.values: list[_Value] = [_Value([], m)] if key_only else []


class NgramMapDrafter(NgramDrafter):
    """ngram-map-k (key_only) and ngram-map-k4v: n-gram lookup with per-key statistics that adapt."""

    def __init__(self, params: NgramParams, key_only: bool):
        super().__init__()
        if key_only:
            self.name = "ngram-map-k"
            self.n, self.m = params.ngram_map_k_size_n, params.ngram_map_k_size_m
            self.min_hits = params.ngram_map_k_min_hits
        else:
            self.name = "ngram-map-k4v"
            self.n, self.m = params.ngram_map_k4v_size_n, params.ngram_map_k4v_size_m
            self.min_hits = params.ngram_map_k4v_min_hits
        self.key_only = key_only
        self.max_len = self.m
        self._occ = _ChainIndex(self.n)
        self._keys: dict[tuple[int, ...], _Key] = {}
        self._last: _Value | None = None  # the value the last draft came from

    def _rebuild(self) -> None:
        self._occ.clear()
        self._keys.clear()
        self._last = None
        self._occ.update(self._seq)

    def _index(self, start: int) -> None:
        self._occ.update(self._seq)

    def draft(self, n_max: int) -> list[int]:
        self._last = None
        seq, n, m = self._seq, self.n, self.m
        cur_len = len(seq) - 1
        if n_max <= 0 or cur_len < 2 * n + m:
            return []
        key = tuple(seq[-n:])
        # Occurrences with at least m + 1 tokens after them, never position 0 (llama.cpp's bounds).
        pos = self._occ.latest(key, cur_len - n - m - 1)
        if pos < 1:
            return []
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _Key(m, self.key_only)
        st.hits = min(st.hits + 1, _MAX_COUNT)

        if self.key_only:
            value = st.values[0]
            n_draft = min(m, value.n_accepted, n_max)
            if n_draft <= 0:
                return []
            self._last = value
            return seq[pos + n:pos + n + n_draft]

        if st.hits < self.min_hits:
            return []
        self._count_values(st, pos)
        best = max(st.values, key=lambda v: v.count)  # first of equals, as llama.cpp's strict >
        others = sum(v.count for v in st.values) - best.count
        if others > 0 and best.count < 2 * others:
            return []  # no continuation dominates
        n_draft = min(m, best.n_accepted, n_max)
        if n_draft <= 0:
            return []
        self._last = best
        return best.tokens[:n_draft]

    def _count_values(self, st: _Key, pos: int) -> None:
        """Count the continuations of the key's occurrences in (st.stat_pos, pos], oldest first."""
        if pos <= st.stat_pos:
            return
        new = []
        p, prev = pos, self._occ.prev
        while p > st.stat_pos:
            new.append(p)
            p = prev[p]
        seq, n, m = self._seq, self.n, self.m
        values = st.values
        for p in reversed(new):
            tokens = seq[p + n:p + n + m]
            for v in values:
                if v.tokens == tokens:
                    v.count = min(v.count + 1, _MAX_COUNT)
                    break
            else:
                if len(values) < _MAX_VALUES:  # a fifth distinct continuation is not counted
                    v = _Value(tokens, m)
                    v.count = 1
                    values.append(v)
        st.stat_pos = pos

    def feedback(self, n_drafted: int, n_accepted: int) -> None:
        _check_feedback(n_drafted, n_accepted)
        if self._last is not None:
            self._last.n_accepted = n_accepted
            self._last = None
