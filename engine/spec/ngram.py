"""N-gram drafters: speculative decoding without a draft model (llama.cpp's ngram-* --spec-type values).

Each drafter looks for the end of a slot's token sequence earlier in that sequence (or in a table built
from it) and proposes what followed there. Names, parameters, defaults and ranges are llama.cpp's
(common/speculative.cpp, ngram-map.cpp, ngram-mod.cpp, ngram-cache.cpp, common.h, arg.cpp):

- ngram-simple: the last size_n tokens are searched for in the history (most recent occurrence, never
  the one at position 0); the draft is what followed, up to size_m tokens, and nothing unless at least
  size_n tokens followed.
- ngram-map-k: same lookup, but the draft length adapts per key n-gram: after a draft from a key, the
  next draft from that key is at most as long as the number of tokens the verifier accepted last time
  (a key whose draft was fully rejected stops drafting, as in llama.cpp).
- ngram-map-k4v: per key n-gram, the distinct size_m-token continuations of its occurrences are counted
  (the first 4 distinct ones, hence "4v"); the most frequent one is drafted when it occurs at least twice
  as often as all the others together and the key was looked up at least min_hits times. The draft
  length adapts per (key, value) as in ngram-map-k.
- ngram-mod: a hash table of 4M entries maps the hash of every n_match-gram to the token that followed it
  (collisions overwrite). The draft chains lookups: at least n_min and at most n_max tokens, else nothing.
  The table outlives requests; it is cleared when reset() finds it over 25 % full, and after 5 drafts in a
  row with an acceptance fraction under 0.25 (then the current sequence is indexed again).
- ngram-cache: counts, for every 1..4-gram of the sequence, the tokens that followed it (the "context"
  cache); drafts up to 8 tokens one at a time, from the longest n-gram whose most frequent follower is
  frequent enough (llama.cpp's thresholds), then from a dynamic and then a static cache loaded from
  llama.cpp lookup-cache files (--lookup-cache-dynamic / --lookup-cache-static).

Interface: one drafter per slot; reset(prompt) at a new request, extend(tokens) with every token appended
to the slot (the sampled one included) before draft(n_max), feedback(n_drafted, n_accepted) after
verification. The last token of the sequence plays the role of llama.cpp's `id_last`. draft() returns what
llama.cpp's drafter returns truncated to n_max (llama.cpp truncates to the slot's n_max after drafting).
Indexes are updated in extend(), so draft() costs O(draft length), not O(history).

Where this differs from llama.cpp, on purpose:
- reset() forgets the previous request (except ngram-mod's table, which llama.cpp shares across requests).
  llama.cpp keeps the ngram-map keys and the ngram-cache context across requests on a slot and, for
  ngram-cache, updates the context cache only from each draft call's new tokens, so n-grams that straddle
  two calls are never counted; here the context cache holds every n-gram of the sequence, as llama-lookup.
- ngram-map-k/k4v look keys up with an exact index (most recent occurrence with size_m tokens after it);
  llama.cpp uses a 2^18-entry hash keeping the first index inserted, which misses keys on collisions.
  k4v counts each occurrence once (llama.cpp recounts the match position at each lookup) and drafts the
  most frequent continuation itself (llama.cpp drafts the tokens after the matched occurrence even when
  the statistics chose another continuation).
- ngram-mod adds n-grams to its table in extend(); llama.cpp adds them in chunks of 32 at draft time, a
  speed measure, so here the newest n-grams are usable at once. Its feedback fraction uses the number of
  tokens actually verified (llama.cpp divides by the untruncated draft length).
- ngram-cache breaks ties between equally frequent followers by recency (the token whose count changed
  last); llama.cpp's tie order is std::unordered_map iteration order.
- min_hits is unused by ngram-simple and ngram-map-k, as in llama.cpp (only ngram-map-k4v reads it).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from nextn.errors import ConfigError

log = logging.getLogger(__name__)

NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")

# (flag, NgramParams field, type, default, help): llama.cpp's flag names, defaults and help texts.
FLAGS: list[tuple[str, str, type, object, str]] = [
    ("--spec-ngram-simple-size-n", "ngram_simple_size_n", int, 12,
     "ngram size N for ngram-simple speculative decoding, length of lookup n-gram (default: 12)"),
    ("--spec-ngram-simple-size-m", "ngram_simple_size_m", int, 48,
     "ngram size M for ngram-simple speculative decoding, length of draft m-gram (default: 48)"),
    ("--spec-ngram-simple-min-hits", "ngram_simple_min_hits", int, 1,
     "minimum hits for ngram-simple speculative decoding (default: 1)"),
    ("--spec-ngram-map-k-size-n", "ngram_map_k_size_n", int, 12,
     "ngram size N for ngram-map-k speculative decoding, length of lookup n-gram (default: 12)"),
    ("--spec-ngram-map-k-size-m", "ngram_map_k_size_m", int, 48,
     "ngram size M for ngram-map-k speculative decoding, length of draft m-gram (default: 48)"),
    ("--spec-ngram-map-k-min-hits", "ngram_map_k_min_hits", int, 1,
     "minimum hits for ngram-map-k speculative decoding (default: 1)"),
    ("--spec-ngram-map-k4v-size-n", "ngram_map_k4v_size_n", int, 12,
     "ngram size N for ngram-map-k4v speculative decoding, length of lookup n-gram (default: 12)"),
    ("--spec-ngram-map-k4v-size-m", "ngram_map_k4v_size_m", int, 48,
     "ngram size M for ngram-map-k4v speculative decoding, length of draft m-gram (default: 48)"),
    ("--spec-ngram-map-k4v-min-hits", "ngram_map_k4v_min_hits", int, 1,
     "minimum hits for ngram-map-k4v speculative decoding (default: 1)"),
    ("--spec-ngram-mod-n-match", "ngram_mod_n_match", int, 24,
     "ngram-mod lookup length (default: 24)"),
    ("--spec-ngram-mod-n-max", "ngram_mod_n_max", int, 64,
     "maximum number of ngram tokens to use for ngram-based speculative decoding (default: 64)"),
    ("--spec-ngram-mod-n-min", "ngram_mod_n_min", int, 48,
     "minimum number of ngram tokens to use for ngram-based speculative decoding (default: 48)"),
    ("--lookup-cache-static", "lookup_cache_static", str, "",
     "path to static lookup cache to use for lookup decoding (not updated by generation)"),
    # llama.cpp's help says "(updated by generation)", true of llama-lookup only: llama-server reads it.
    ("--lookup-cache-dynamic", "lookup_cache_dynamic", str, "",
     "path to dynamic lookup cache to use for lookup decoding (read at start, not updated, as llama-server)"),
]
FLAG_ALIASES = {"-lcs": "--lookup-cache-static", "-lcd": "--lookup-cache-dynamic"}

# Allowed ranges (inclusive; None = unbounded), as arg.cpp checks them.
_RANGES: dict[str, tuple[int, int | None]] = {
    "ngram_simple_size_n": (1, 1024), "ngram_simple_size_m": (1, 1024), "ngram_simple_min_hits": (1, None),
    "ngram_map_k_size_n": (1, 1024), "ngram_map_k_size_m": (1, 1024), "ngram_map_k_min_hits": (1, None),
    "ngram_map_k4v_size_n": (1, 1024), "ngram_map_k4v_size_m": (1, 1024), "ngram_map_k4v_min_hits": (1, None),
    "ngram_mod_n_match": (1, 1024), "ngram_mod_n_max": (0, 1024), "ngram_mod_n_min": (0, 1024),
}
_FIELD_FLAG = {field: flag for flag, field, _, _, _ in FLAGS}


@dataclass(frozen=True)
class NgramParams:
    """Every parameter of the n-gram drafters; field = flag name without `--spec-`, dashes as underscores."""

    ngram_simple_size_n: int = 12  # key n-gram length
    ngram_simple_size_m: int = 48  # draft length
    ngram_simple_min_hits: int = 1  # unused by ngram-simple, as in llama.cpp
    ngram_map_k_size_n: int = 12
    ngram_map_k_size_m: int = 48
    ngram_map_k_min_hits: int = 1  # unused by ngram-map-k, as in llama.cpp
    ngram_map_k4v_size_n: int = 12
    ngram_map_k4v_size_m: int = 48
    ngram_map_k4v_min_hits: int = 1  # lookups of a key before its statistics are used
    ngram_mod_n_match: int = 24  # hashed n-gram length
    ngram_mod_n_max: int = 64  # longest draft
    ngram_mod_n_min: int = 48  # shortest draft; a shorter chain drafts nothing
    lookup_cache_static: str = ""  # llama.cpp lookup-cache file of 2-grams ("" = none)
    lookup_cache_dynamic: str = ""  # llama.cpp lookup-cache file of 1..4-grams ("" = none)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            flag = _FIELD_FLAG[f.name]
            if f.type == "str":
                if not isinstance(value, str):
                    raise ValueError(f"{flag}: expected a path string, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                # ValueError, not TypeError: every bad setting is one kind of error for the config layer
                raise ValueError(f"{flag}: expected an integer, got {value!r}")  # noqa: TRY004
            object.__setattr__(self, f.name, int(value))  # frozen; a numpy integer becomes a plain int
            lo, hi = _RANGES[f.name]
            if value < lo or (hi is not None and value > hi):
                allowed = f"between {lo} and {hi} inclusive" if hi is not None else f"at least {lo}"
                raise ValueError(f"{flag}: must be {allowed}, got {value}")

    @classmethod
    def from_flags(cls, values: Mapping[str, object]) -> NgramParams:
        """Params from {flag or field: value}; keys may be '--spec-ngram-mod-n-max', 'spec-ngram-mod-n-max',
        'spec_ngram_mod_n_max', 'ngram_mod_n_max' or '-lcs'/'-lcd'; integer values may be strings (CLI).
        Raises ValueError naming the flag and the allowed range."""
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            field = _field_of(key)
            flag = _FIELD_FLAG[field]
            if field not in _RANGES:
                kwargs[field] = value
            elif isinstance(value, str):
                try:
                    kwargs[field] = int(value.strip(), 10)
                except ValueError:
                    raise ValueError(f"{flag}: expected an integer, got {value!r}") from None
            else:
                kwargs[field] = value
        return cls(**kwargs)


def _field_of(key: str) -> str:
    name = FLAG_ALIASES.get(key, key).lstrip("-").replace("-", "_")
    name = name.removeprefix("spec_")
    if name not in _FIELD_FLAG:
        known = ", ".join(flag for flag, *_ in FLAGS)
        raise ValueError(f"unknown n-gram speculation option {key!r}; known: {known}")
    return name


class NgramDrafter(abc.ABC):
    """One slot's n-gram drafter. The sequence is the request's prompt plus every token appended since.
    Each type implements draft() (and its indexing in _index)."""

    name = ""
    max_len = 0  # the longest draft this type proposes (llama.cpp's per-type n_max)

    def __init__(self):
        self._seq: list[int] = []

    def reset(self, tokens: Sequence[int]) -> None:
        """A new request: index its prompt tokens."""
        self._seq = _ints(tokens)
        self._rebuild()

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens appended to the slot's sequence (accepted drafts, the sampled token)."""
        start = len(self._seq)
        self._seq.extend(_ints(tokens))
        self._index(start)

    @abc.abstractmethod
    def draft(self, n_max: int) -> list[int]:
        """Up to n_max proposed continuations of the sequence ([] = nothing to propose)."""

    def propose(self, k: int):
        """spec.drafter.Drafter's interface: the drafts, point proposals."""
        return self.draft(k), None

    def feedback(self, n_drafted: int, n_accepted: int) -> None:
        """How many of the last draft's n_drafted tokens the verifier accepted."""
        _check_feedback(n_drafted, n_accepted)

    def _rebuild(self) -> None:
        self._index(0)

    def _index(self, start: int) -> None:
        """Index what self._seq[start:] adds."""


def _ints(tokens: Sequence[int]) -> list[int]:
    if isinstance(tokens, np.ndarray):
        return tokens.astype(np.int64, copy=False).ravel().tolist()
    return [int(t) for t in tokens]


def _check_feedback(n_drafted: int, n_accepted: int) -> None:
    if not 0 <= n_accepted <= n_drafted:
        raise ValueError(f"feedback: need 0 <= n_accepted <= n_drafted, got {n_accepted}, {n_drafted}")


class _ChainIndex:
    """Where each n-gram of a growing sequence occurs: its latest start, and for every start the previous
    start of the same n-gram (-1 if none), so older occurrences are one list lookup away."""

    def __init__(self, n: int):
        self.n = n
        self.last: dict[tuple[int, ...], int] = {}
        self.prev: list[int] = []

    def clear(self) -> None:
        self.last.clear()
        self.prev.clear()

    def update(self, seq: list[int]) -> None:
        """Index every n-gram that is complete in seq and not indexed yet."""
        n, last, prev = self.n, self.last, self.prev
        for i in range(len(prev), len(seq) - n + 1):
            key = tuple(seq[i:i + n])
            prev.append(last.get(key, -1))
            last[key] = i

    def latest(self, key: tuple[int, ...], limit: int) -> int:
        """The last start <= limit of `key`, or -1. Occurrences above limit are the last few positions
        of the sequence, so the walk is short."""
        pos = self.last.get(key, -1)
        prev = self.prev
        while pos > limit:
            pos = prev[pos]
        return pos


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


# ngram-cache (llama.cpp common/ngram-cache.cpp): n-gram sizes, static n-gram size and thresholds.
NGRAM_CACHE_MIN = 1
NGRAM_CACHE_MAX = 4
NGRAM_CACHE_STATIC = 2
NGRAM_CACHE_N_DRAFT = 8  # fixed in llama.cpp too (it has no flag for it)
# Index = n-gram size - 1. A draft token needs at least this many samples and this share of them.
_LAX_MIN_SAMPLES = (2, 2, 1, 1)
_LAX_MIN_PERCENT = (66, 50, 50, 50)
_STRICT_MIN_SAMPLES = (4, 3, 2, 2)
_STRICT_MIN_PERCENT = (75, 66, 66, 66)
_TOKEN_NULL = -1  # llama.cpp pads n-grams shorter than 4 with LLAMA_TOKEN_NULL in cache files


class _Followers:
    """The tokens seen after one n-gram with their counts, and the most frequent one kept up to date.
    `counts` is ordered by last change (a changed token moves to the end), which breaks ties by recency."""

    __slots__ = ("best", "best_count", "counts", "total")

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.best = _TOKEN_NULL
        self.best_count = 0
        self.total = 0

    def add(self, token: int, count: int = 1) -> None:
        c = self.counts.pop(token, 0) + count
        self.counts[token] = c
        self.total += count
        if c >= self.best_count:
            self.best, self.best_count = token, c


NgramCache = dict[tuple[int, ...], _Followers]


def load_ngram_cache(path: str, flag: str = "--lookup-cache-static") -> NgramCache:
    """Read a llama.cpp lookup cache (llama-lookup-create / llama-lookup output): records of an n-gram as 4
    int32 padded with -1, an int32 count of followers, then (int32 token, int32 count) pairs; native byte
    order (little-endian on every machine nextn runs on). Raises ConfigError naming the flag and file."""
    try:
        raw = np.fromfile(path, dtype="<i4")
        size = os.path.getsize(path)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read lookup cache {path}: {e.strerror or e}") from None
    if size % 4:
        raise ConfigError(f"{flag}: {path} is not a llama.cpp lookup cache (size {size} is not a multiple of 4)")
    words = raw.tolist()
    cache: NgramCache = {}
    pos, end = 0, len(words)
    while pos < end:
        if pos + 5 > end:
            raise ConfigError(f"{flag}: {path} is truncated (record at byte {4 * pos})")
        gram = words[pos:pos + NGRAM_CACHE_MAX]
        while gram and gram[-1] == _TOKEN_NULL:
            gram.pop()
        n_tokens = words[pos + NGRAM_CACHE_MAX]
        body = pos + NGRAM_CACHE_MAX + 1
        if not gram or n_tokens <= 0 or body + 2 * n_tokens > end:
            raise ConfigError(f"{flag}: {path} is not a llama.cpp lookup cache (bad record at byte {4 * pos})")
        part = cache.get(tuple(gram))
        if part is None:
            part = cache[tuple(gram)] = _Followers()
        for j in range(body, body + 2 * n_tokens, 2):
            if words[j + 1] <= 0:
                raise ConfigError(f"{flag}: {path}: non-positive count in record at byte {4 * pos}")
            part.add(words[j], words[j + 1])
        pos = body + 2 * n_tokens
    return cache


def _draft_primary(cache: NgramCache, tail: list[int], static: _Followers | None,
                   min_samples: tuple[int, ...], min_percent: tuple[int, ...]) -> int:
    """A token from the context or dynamic cache: the longest n-gram ending the sequence whose best
    follower passes the thresholds. With a static cache, a follower's count is weighted by 100 x its
    count after the last 2 tokens in the static cache (1 when absent there)."""
    for size in range(min(NGRAM_CACHE_MAX, len(tail)), NGRAM_CACHE_MIN - 1, -1):
        part = cache.get(tuple(tail[-size:]))
        if part is None:
            continue
        if static is None:
            best, best_count = part.best, part.best_count
        else:
            best, best_count, best_score, weights = _TOKEN_NULL, 0, 0, static.counts
            for tok, c in reversed(part.counts.items()):  # most recently changed first: ties by recency
                s = c * (100 * weights[tok] if tok in weights else 1)
                if s > best_score:
                    best, best_count, best_score = tok, c, s
        if part.total < min_samples[size - 1] or 100 * best_count < min_percent[size - 1] * part.total:
            continue
        return best
    return _TOKEN_NULL


class NgramCacheDrafter(NgramDrafter):
    """ngram-cache: follower counts of every 1..4-gram of the sequence, plus optional lookup cache files."""

    name = "ngram-cache"
    max_len = NGRAM_CACHE_N_DRAFT

    def __init__(self, params: NgramParams, static: NgramCache | None = None, dynamic: NgramCache | None = None):
        super().__init__()
        self._context: NgramCache = {}
        self._static = static or {}  # read-only, may be shared between slots
        self._dynamic = dynamic or {}

    def _rebuild(self) -> None:
        self._context = {}
        self._index(0)

    def _index(self, start: int) -> None:
        seq, ctx = self._seq, self._context
        for i in range(max(start, NGRAM_CACHE_MIN), len(seq)):
            tok = seq[i]
            gram = tuple(seq[max(0, i - NGRAM_CACHE_MAX):i])
            for k in range(len(gram)):  # the 4-, 3-, 2- and 1-gram before token i
                key = gram[k:]
                part = ctx.get(key)
                if part is None:
                    part = ctx[key] = _Followers()
                part.add(tok)

    def draft(self, n_max: int) -> list[int]:
        seq = self._seq
        if n_max <= 0 or len(seq) < NGRAM_CACHE_STATIC:
            return []
        # Each token depends only on the ones before it, so stopping at n_max equals truncating after.
        want = min(NGRAM_CACHE_N_DRAFT, n_max)
        static_cache, dynamic = self._static, self._dynamic
        tail = seq[-NGRAM_CACHE_MAX:]
        out: list[int] = []
        while len(out) < want:
            static = static_cache.get(tuple(tail[-NGRAM_CACHE_STATIC:])) if static_cache else None
            tok = _draft_primary(self._context, tail, static, _LAX_MIN_SAMPLES, _LAX_MIN_PERCENT)
            if tok == _TOKEN_NULL and dynamic:
                tok = _draft_primary(dynamic, tail, static, _STRICT_MIN_SAMPLES, _STRICT_MIN_PERCENT)
            if tok == _TOKEN_NULL and static is not None:
                i = NGRAM_CACHE_STATIC - 1
                if static.total >= _LAX_MIN_SAMPLES[i] and 100 * static.best_count >= _LAX_MIN_PERCENT[i] * static.total:
                    tok = static.best
            if tok == _TOKEN_NULL:
                break
            out.append(tok)
            tail.append(tok)
        return out


class NgramShared:
    """What llama.cpp keeps once for all slots: ngram-mod's hash table and the lookup cache files. Make one
    per model and pass it to every slot's make_ngram_drafter; without it each drafter gets its own (a
    16 MiB table per ngram-mod slot, a copy of the cache files per ngram-cache slot)."""

    def __init__(self, params: NgramParams):
        self.params = params
        self._mod_table: NgramModTable | None = None
        self._caches: dict[str, NgramCache] = {}

    def mod_table(self) -> NgramModTable:
        if self._mod_table is None:
            self._mod_table = NgramModTable(self.params.ngram_mod_n_match)
        return self._mod_table

    def lookup_cache(self, flag: str, path: str) -> NgramCache | None:
        if not path:
            return None
        if path not in self._caches:
            self._caches[path] = load_ngram_cache(path, flag)
        return self._caches[path]


def make_ngram_drafter(spec_type: str, params: NgramParams, shared: NgramShared | None = None) -> NgramDrafter:
    """The drafter for one slot. Raises ValueError for a type that is not an n-gram type."""
    if spec_type == "ngram-simple":
        return NgramSimpleDrafter(params)
    if spec_type == "ngram-map-k":
        return NgramMapDrafter(params, key_only=True)
    if spec_type == "ngram-map-k4v":
        return NgramMapDrafter(params, key_only=False)
    if spec_type in ("ngram-mod", "ngram-cache"):
        if shared is None:
            shared = NgramShared(params)
        elif shared.params != params:
            raise ValueError("make_ngram_drafter: `shared` was made with other NgramParams")
        if spec_type == "ngram-mod":
            if params.ngram_mod_n_match < 16:
                log.warning("ngram-mod n_match=%d is small: drafts may be poor (llama.cpp advises >= 16)",
                            params.ngram_mod_n_match)
            return NgramModDrafter(params, shared.mod_table())
        return NgramCacheDrafter(
            params,
            static=shared.lookup_cache("--lookup-cache-static", params.lookup_cache_static),
            dynamic=shared.lookup_cache("--lookup-cache-dynamic", params.lookup_cache_dynamic),
        )
    raise ValueError(f"unknown n-gram speculation type {spec_type!r}; known: {', '.join(NGRAM_TYPES)}")
