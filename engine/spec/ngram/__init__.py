"""N-gram drafters: speculative decoding without a draft model (llama.cpp's ngram-* --spec-type values).

Each drafter looks for the end of a slot's token sequence earlier in that sequence (or in a table built
from it) and proposes what followed there. Names, parameters, defaults and ranges are llama.cpp's
(common/speculative.cpp, ngram-map.cpp, ngram-mod.cpp, ngram-cache.cpp, common.h, arg.cpp). One module
per family; each says what its drafter does and where it differs from llama.cpp:

- simple.py: ngram-simple, what followed the most recent earlier occurrence of the last size_n tokens.
- map_k.py: ngram-map-k and ngram-map-k4v, the same lookup with per-key statistics that adapt the draft.
- mod.py: ngram-mod, chained lookups in a hash table of n-grams shared by all slots.
- cache.py: ngram-cache, follower counts of 1..4-grams, plus llama.cpp lookup-cache files.
- base.py: what they share: their parameters and flags (NgramParams, FLAGS) and the drafter interface.

This module makes a slot's drafter from its --spec-type name (make_ngram_drafter) and holds what llama.cpp
keeps once for all slots (NgramShared); other code imports everything it needs from here.

Where this differs from llama.cpp, on purpose, for every type: reset() forgets the previous request (except
ngram-mod's table, which llama.cpp shares across requests). llama.cpp keeps the ngram-map keys and the
ngram-cache context across requests on a slot.
"""

from __future__ import annotations

import logging

from nextn.spec.ngram.base import FLAG_ALIASES, FLAGS, NgramDrafter, NgramParams
from nextn.spec.ngram.cache import (
    NGRAM_CACHE_MAX,
    NGRAM_CACHE_MIN,
    NGRAM_CACHE_N_DRAFT,
    NGRAM_CACHE_STATIC,
    NgramCache,
    NgramCacheDrafter,
    load_ngram_cache,
)
from nextn.spec.ngram.map_k import NgramMapDrafter
from nextn.spec.ngram.mod import NgramModDrafter, NgramModTable
from nextn.spec.ngram.simple import NgramSimpleDrafter

__all__ = [
    "FLAGS",
    "FLAG_ALIASES",
    "NGRAM_CACHE_MAX",
    "NGRAM_CACHE_MIN",
    "NGRAM_CACHE_N_DRAFT",
    "NGRAM_CACHE_STATIC",
    "NGRAM_TYPES",
    "NgramCache",
    "NgramCacheDrafter",
    "NgramDrafter",
    "NgramMapDrafter",
    "NgramModDrafter",
    "NgramModTable",
    "NgramParams",
    "NgramShared",
    "NgramSimpleDrafter",
    "load_ngram_cache",
    "make_ngram_drafter",
]

log = logging.getLogger(__name__)

NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")


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
