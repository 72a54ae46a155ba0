"""ngram-cache: counts, for every 1..4-gram of the sequence, the tokens that followed it (the "context"
cache); drafts up to 8 tokens one at a time, from the longest n-gram whose most frequent follower is
frequent enough (llama.cpp's thresholds), then from a dynamic and then a static cache loaded from
llama.cpp lookup-cache files (--lookup-cache-dynamic / --lookup-cache-static).

Where this differs from llama.cpp, on purpose:
- llama.cpp updates the context cache only from each draft call's new tokens, so n-grams that straddle
  two calls are never counted; here the context cache holds every n-gram of the sequence, as llama-lookup.
- Ties between equally frequent followers are broken by recency (the token whose count changed last);
  llama.cpp's tie order is std::unordered_map iteration order.
"""

from __future__ import annotations

import os

import numpy as np

from nextn.errors import ConfigError
from nextn.spec.ngram.base import NgramDrafter, NgramParams

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
