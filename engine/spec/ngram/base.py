"""What every n-gram drafter shares: its parameters (NgramParams, with llama.cpp's flag names, defaults,
help texts and ranges in FLAGS), the NgramDrafter interface, and the occurrence index that ngram-simple and
ngram-map-k/k4v look keys up in.

Interface: one drafter per slot; reset(prompt) at a new request, extend(tokens) with every token appended
to the slot (the sampled one included) before draft(n_max), feedback(n_drafted, n_accepted) after
verification. The last token of the sequence plays the role of llama.cpp's `id_last`. draft() returns what
llama.cpp's drafter returns truncated to n_max (llama.cpp truncates to the slot's n_max after drafting).
Indexes are updated in extend(), so draft() costs O(draft length), not O(history).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from nextn.spec.drafter import Drafter

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


class NgramDrafter(Drafter, abc.ABC):
    """One slot's n-gram drafter (a spec.drafter.Drafter). The sequence is the request's prompt plus every
    token appended since. Each type implements draft() (and its indexing in _index)."""

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
        """The drafts, as point proposals (an n-gram match has no distribution)."""
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
