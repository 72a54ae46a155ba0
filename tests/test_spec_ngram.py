"""The n-gram drafters (nextn.spec.ngram) on hand-made sequences whose drafts are worked out by hand from
llama.cpp's rules, incremental indexing against a rebuild, parameter validation, lookup-cache files, and the
cost of a draft on an 8k-token history."""

import random
import statistics
import time

import numpy as np
import pytest

from nextn.errors import ConfigError
from nextn.spec import ngram
from nextn.spec.ngram import (
    FLAGS,
    NGRAM_TYPES,
    NgramModTable,
    NgramParams,
    NgramShared,
    make_ngram_drafter,
)


def drafter(spec_type, tokens, **params):
    d = make_ngram_drafter(spec_type, NgramParams(**params))
    d.reset(tokens)
    return d


# --- ngram-simple (size_n=2, size_m=3): needs more than n + m + 2 = 7 tokens -------------------------------

SIMPLE = {"ngram_simple_size_n": 2, "ngram_simple_size_m": 3}


def test_simple_repeated_phrase():
    d = drafter("ngram-simple", [0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2], **SIMPLE)
    assert d.draft(8) == [3, 4, 5]  # size_m tokens after the earlier (1, 2)
    assert d.draft(2) == [3, 4]  # n_max smaller than the match
    assert d.draft(0) == []


def test_simple_most_recent_occurrence():
    d = drafter("ngram-simple", [0, 1, 2, 3, 4, 5, 1, 2, 7, 8, 9, 1, 2], **SIMPLE)
    assert d.draft(8) == [7, 8, 9]


def test_simple_no_match_and_position_zero():
    assert drafter("ngram-simple", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2], **SIMPLE).draft(8) == []
    # llama.cpp never matches at position 0
    assert drafter("ngram-simple", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], **SIMPLE).draft(8) == []
    # too short a history: cur_len (tokens before the last) must exceed n + m + 1
    assert drafter("ngram-simple", [0, 1, 2, 3, 4, 1, 2], **SIMPLE).draft(8) == []


def test_simple_match_at_the_very_end():
    # the earlier (1, 2) has only 2 tokens after it before the last token: a 2-token draft (>= size_n)
    assert drafter("ngram-simple", [0, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 1, 2], **SIMPLE).draft(8) == [3, 1]
    # only 1 token after it: fewer than size_n, no draft
    assert drafter("ngram-simple", [0, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 1, 2], **SIMPLE).draft(8) == []


def test_simple_overlapping_matches():
    # period 3: the latest usable (2, 3) overlaps the key; what follows it runs into the key itself
    assert drafter("ngram-simple", [0] + [1, 2, 3] * 5, **SIMPLE).draft(8) == [1, 2]
    # a constant run: the latest match is always one token from the end, so never size_n tokens after it
    assert drafter("ngram-simple", [0] + [7] * 13, **SIMPLE).draft(8) == []


# --- ngram-map-k (size_n=2, size_m=3): a key needs m + 1 tokens after it --------------------------------

MAPK = {"ngram_map_k_size_n": 2, "ngram_map_k_size_m": 3}


def test_map_k_draft_and_adaptation():
    d = drafter("ngram-map-k", [0, 1, 2, 3, 4, 5, 9, 9, 9, 9, 1, 2], **MAPK)
    assert d.draft(8) == [3, 4, 5]
    assert d.draft(2) == [3, 4]
    d.feedback(2, 1)  # the last draft (2 tokens) had 1 accepted: this key now drafts at most 1
    assert d.draft(8) == [3]
    d.feedback(1, 0)  # fully rejected: the key stops drafting (llama.cpp's n_accepted = 0)
    assert d.draft(8) == []
    d.extend([6, 6, 6, 6, 4, 5])  # another key still drafts in full
    assert d.draft(8) == [9, 9, 9]


def test_map_k_no_match_end_match_and_min_hits_unused():
    assert drafter("ngram-map-k", [0, 1, 2, 3, 4, 5, 9, 9, 9, 9, 7, 8], **MAPK).draft(8) == []
    # the earlier (1, 2) has only m tokens after it before the last token: not usable (llama.cpp needs m + 1)
    assert drafter("ngram-map-k", [0, 9, 9, 9, 9, 9, 1, 2, 3, 4, 1, 2], **MAPK).draft(8) == []
    assert drafter("ngram-map-k", [0, 9, 9, 9, 9, 1, 2, 3, 4, 5, 1, 2], **MAPK).draft(8) == [3, 4, 5]
    # min_hits is read by ngram-map-k4v only, as in llama.cpp
    d = drafter("ngram-map-k", [0, 1, 2, 3, 4, 5, 9, 9, 9, 9, 1, 2], ngram_map_k_min_hits=5, **MAPK)
    assert d.draft(8) == [3, 4, 5]


def test_map_k_most_recent_occurrence():
    seq = [0, 1, 2, 3, 4, 5, 1, 2, 6, 7, 8, 9, 9, 9, 9, 1, 2]
    assert drafter("ngram-map-k", seq, **MAPK).draft(8) == [6, 7, 8]


# --- ngram-map-k4v (size_n=2, size_m=2) ------------------------------------------------------------------

K4V = {"ngram_map_k4v_size_n": 2, "ngram_map_k4v_size_m": 2}
TAIL = [9, 9, 9, 9, 9, 1, 2]  # puts the key (1, 2) at the end, far enough from the others


def test_k4v_most_frequent_continuation():
    # (1, 2) was followed by (3, 4) three times, by (5, 6) once - most recently
    seq = [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 6] + TAIL
    d = drafter("ngram-map-k4v", seq, **K4V)
    assert d.draft(8) == [3, 4]
    assert d.draft(1) == [3]
    d.feedback(1, 1)
    assert d.draft(8) == [3]  # adapted to what was accepted


def test_k4v_needs_a_dominant_continuation():
    two_two = [0, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 4, 1, 2, 5, 6] + TAIL
    assert drafter("ngram-map-k4v", two_two, **K4V).draft(8) == []
    two_one = [0, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 4] + TAIL  # 2 >= 2 * 1: drafted
    assert drafter("ngram-map-k4v", two_one, **K4V).draft(8) == [3, 4]
    three_two = [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 4, 1, 2, 7, 8] + TAIL  # 3 < 2 * 2
    assert drafter("ngram-map-k4v", three_two, **K4V).draft(8) == []


def test_k4v_counts_four_continuations_only():
    four = [0, 1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 7, 8, 1, 2, 10, 11]
    fifth = [1, 2, 12, 13] * 5  # a fifth distinct continuation is never counted, however often it occurs
    assert drafter("ngram-map-k4v", four + fifth + TAIL, **K4V).draft(8) == []


def test_k4v_min_hits_counts_lookups():
    seq = [0, 1, 2, 3, 4, 1, 2, 3, 4] + TAIL
    d = drafter("ngram-map-k4v", seq, ngram_map_k4v_min_hits=2, **K4V)
    assert d.draft(8) == []  # first lookup of the key
    assert d.draft(8) == [3, 4]


def test_k4v_statistics_follow_extend():
    d = drafter("ngram-map-k4v", [0, 1, 2, 3, 4, 1, 2, 5, 6] + TAIL, **K4V)
    assert d.draft(8) == []  # 1 vs 1
    d.extend([3, 4, 9, 9, 9, 9, 1, 2])  # (1, 2) -> (3, 4) again at the old end: 2 vs 1
    assert d.draft(8) == [3, 4]


# --- ngram-mod (n_match=3) --------------------------------------------------------------------------------

MOD = {"ngram_mod_n_match": 3, "ngram_mod_n_max": 5, "ngram_mod_n_min": 2}


def test_mod_chain():
    d = drafter("ngram-mod", [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], **MOD)
    assert d.draft(8) == [4, 5, 6, 7, 8]  # n_max = 5
    assert d.draft(3) == [4, 5, 6]
    assert drafter("ngram-mod", [1, 2, 3, 4, 5, 6, 7, 8, 9], **MOD).draft(8) == []


def test_mod_n_min_and_shared_table():
    params = NgramParams(ngram_mod_n_match=3, ngram_mod_n_max=10, ngram_mod_n_min=5)
    shared = NgramShared(params)
    a = make_ngram_drafter("ngram-mod", params, shared)
    b = make_ngram_drafter("ngram-mod", params, shared)
    a.reset([1, 2, 3, 4, 5, 6, 7])
    b.reset([9, 9, 1, 2, 3])  # its key (1, 2, 3) is known from slot a only; the chain stops after 7
    assert b.draft(10) == []  # 4 tokens < n_min
    params4 = NgramParams(ngram_mod_n_match=3, ngram_mod_n_max=10, ngram_mod_n_min=4)
    c = ngram.NgramModDrafter(params4, shared.mod_table())
    c.reset([9, 9, 1, 2, 3])
    assert c.draft(10) == [4, 5, 6, 7]
    assert c.draft(2) == [4, 5]  # n_max below n_min: still needs an n_min chain, then truncated


def test_mod_table_survives_requests():
    d = drafter("ngram-mod", [1, 2, 3, 4, 5, 6, 7, 8], **MOD)
    d.reset([0, 0, 1, 2, 3])  # a new request on the slot: the table keeps the old one's n-grams
    assert d.draft(8) == [4, 5, 6, 7, 8]


def test_mod_adapts_to_low_acceptance():
    params = NgramParams(**MOD)
    shared = NgramShared(params)
    a = make_ngram_drafter("ngram-mod", params, shared)
    a.reset([1, 2, 3, 4, 5, 6, 7, 8])
    b = make_ngram_drafter("ngram-mod", params, shared)
    b.reset([0, 0, 1, 2, 3])
    for _ in range(4):
        assert b.draft(4) == [4, 5, 6, 7]
        b.feedback(4, 0)
    assert b.draft(4) == [4, 5, 6, 7]
    b.feedback(4, 1)  # 0.25 is not low: the streak starts again
    for _ in range(4):
        assert b.draft(4) == [4, 5, 6, 7]
        b.feedback(4, 0)
    b.feedback(4, 0)  # no draft since the last feedback: ignored
    assert b.draft(4) == [4, 5, 6, 7]
    b.feedback(4, 0)  # the fifth low draft in a row: the table is cleared, b's own sequence re-added
    assert b.draft(4) == []
    assert shared.mod_table().used == 2  # (0, 0, 1) -> 2 and (0, 1, 2) -> 3


def test_mod_hash_matches_llama_cpp():
    rng = random.Random(1)
    table = NgramModTable(24)
    for _ in range(20):
        gram = [rng.randrange(262144) for _ in range(24)]
        res = 0
        for t in gram:  # common_ngram_mod::idx in size_t arithmetic
            res = (res * 6364136223846793005 + t) % 2**64
        assert table.hash(gram) == res % (4 * 1024 * 1024)
        assert table.roll(table.hash(gram), gram[0], 77) == table.hash(gram[1:] + [77])


def test_mod_vector_and_loop_indexing_agree():
    rng = random.Random(2)
    seq = [rng.randrange(50) for _ in range(2000)]  # small vocabulary: repeated n-grams, later ones win
    loop, vec = NgramModTable(3), NgramModTable(3)
    for start in range(0, 1990, 100):  # chunks below the vector threshold
        loop.add(seq, start, min(start + 100, 1997))
    vec.add(seq, 0, 1997)
    assert np.array_equal(loop.entries, vec.entries) and loop.used == vec.used


def test_mod_clears_a_full_table_at_reset():
    rng = np.random.default_rng(3)
    d = drafter("ngram-mod", rng.integers(0, 1 << 30, 1_500_000), **MOD)  # ~30 % of 4M entries
    assert d.table.used == 0
    d.reset([1, 2, 3, 4, 5])
    assert d.table.used == 2


# --- ngram-cache ------------------------------------------------------------------------------------------


def test_cache_repeated_phrase():
    d = drafter("ngram-cache", [1, 2, 3, 1, 2, 3, 1, 2])
    assert d.draft(16) == [3, 1, 2, 3, 1, 2, 3, 1]  # 8 tokens at most, as llama.cpp
    assert d.draft(3) == [3, 1, 2]


def test_cache_thresholds():
    assert drafter("ngram-cache", [1, 2, 3, 4]).draft(8) == []
    assert drafter("ngram-cache", [5, 6, 7, 5]).draft(8) == []  # a 1-gram needs 2 samples
    assert drafter("ngram-cache", [5, 6, 5, 7, 9, 5]).draft(8) == []  # ... and 66 % of them
    # (5) -> 6 twice: drafted; then (5, 6) -> {5, 8} once each: 50 % passes for a 2-gram, the tie goes to
    # the follower counted last (8)
    assert drafter("ngram-cache", [5, 6, 5, 6, 8, 5]).draft(2) == [6, 8]


def write_lookup_cache(path, entries):
    """A llama.cpp lookup cache file: {ngram tuple: {token: count}}."""
    words = []
    for gram, followers in entries.items():
        words += list(gram) + [-1] * (4 - len(gram)) + [len(followers)]
        for tok, count in followers.items():
            words += [tok, count]
    np.asarray(words, dtype="<i4").tofile(path)


def test_cache_static_file(tmp_path):
    static = tmp_path / "static.bin"
    write_lookup_cache(static, {(7, 8): {4: 5}, (1, 2): {9: 3, 4: 1}})
    seq = [7, 8, 4, 7, 8, 3, 7, 8]  # context: (7, 8) -> {4, 3} once each
    assert drafter("ngram-cache", seq).draft(1) == [3]  # tie: the later one
    assert drafter("ngram-cache", seq, lookup_cache_static=str(static)).draft(1) == [4]  # weighted by static
    # nothing in the context: the static 2-gram alone (>= 2 samples, >= 50 %), then (2, 9) is unknown
    assert drafter("ngram-cache", [0, 1, 2], lookup_cache_static=str(static)).draft(8) == [9]


def test_cache_dynamic_file(tmp_path):
    dyn = tmp_path / "dynamic.bin"
    write_lookup_cache(dyn, {(1, 2): {3: 3}, (4, 5): {6: 2}})
    assert drafter("ngram-cache", [0, 1, 2], lookup_cache_dynamic=str(dyn)).draft(8) == [3]
    assert drafter("ngram-cache", [0, 4, 5], lookup_cache_dynamic=str(dyn)).draft(8) == []  # strict: 3 samples


def test_cache_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="--lookup-cache-static"):
        drafter("ngram-cache", [1], lookup_cache_static=str(tmp_path / "missing.bin"))
    bad = tmp_path / "bad.bin"
    np.asarray([1, 2, -1, -1, 3, 7], dtype="<i4").tofile(bad)  # 3 followers announced, half of one there
    with pytest.raises(ConfigError, match="--lookup-cache-dynamic"):
        drafter("ngram-cache", [1], lookup_cache_dynamic=str(bad))


def test_shared_loads_a_cache_file_once(tmp_path):
    static = tmp_path / "static.bin"
    write_lookup_cache(static, {(1, 2): {9: 3}})
    params = NgramParams(lookup_cache_static=str(static))
    shared = NgramShared(params)
    a = make_ngram_drafter("ngram-cache", params, shared)
    b = make_ngram_drafter("ngram-cache", params, shared)
    assert a._static is b._static


# --- all types --------------------------------------------------------------------------------------------

SMALL = NgramParams(
    ngram_simple_size_n=3, ngram_simple_size_m=6,
    ngram_map_k_size_n=3, ngram_map_k_size_m=6,
    ngram_map_k4v_size_n=2, ngram_map_k4v_size_m=3,
    ngram_mod_n_match=3, ngram_mod_n_max=12, ngram_mod_n_min=2,
)


def repetitive(rng, length, vocab=40):
    seq = []
    while len(seq) < length:
        if len(seq) > 20 and rng.random() < 0.6:
            start = rng.randrange(len(seq) - 10)
            seq += seq[start:start + rng.randrange(5, 30)]
        else:
            seq += [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
    return seq[:length]


@pytest.mark.parametrize("spec_type", NGRAM_TYPES)
def test_extend_equals_reset(spec_type):
    rng = random.Random(spec_type)
    seq = repetitive(rng, 400)
    inc = make_ngram_drafter(spec_type, SMALL)
    inc.reset(seq[:50])
    pos, n_drafts = 50, 0
    while pos < len(seq):
        step = rng.randrange(1, 9)
        inc.extend(np.asarray(seq[pos:pos + step]) if step > 4 else seq[pos:pos + step])
        pos = min(pos + step, len(seq))
        full = make_ngram_drafter(spec_type, SMALL)
        full.reset(seq[:pos])
        for n_max in (16, 3):
            got = inc.draft(n_max)
            assert got == full.draft(n_max), (spec_type, pos, n_max)
            n_drafts += bool(got)
        if spec_type == "ngram-mod":
            assert np.array_equal(inc.table.entries, full.table.entries)
        if spec_type.startswith("ngram-map"):
            inc = make_ngram_drafter(spec_type, SMALL)  # lookups change key statistics: start afresh
            inc.reset(seq[:pos])
    assert n_drafts > 10  # the sequence does exercise drafting


@pytest.mark.parametrize("spec_type", NGRAM_TYPES)
def test_feedback_rejects_impossible_counts(spec_type):
    d = make_ngram_drafter(spec_type, SMALL)
    d.reset([1, 2, 3])
    with pytest.raises(ValueError, match="n_accepted"):
        d.feedback(2, 3)
    d.feedback(0, 0)  # no draft: nothing to learn


def test_unknown_type():
    with pytest.raises(ValueError, match="draft-mtp"):
        make_ngram_drafter("draft-mtp", NgramParams())


# --- parameters -------------------------------------------------------------------------------------------


def test_flag_table_matches_params():
    defaults = NgramParams()
    assert [f for _, f, _, _, _ in FLAGS] == list(defaults.__dataclass_fields__)
    for flag, field, typ, default, help_text in FLAGS:
        assert getattr(defaults, field) == default and isinstance(default, typ)
        assert flag.startswith("--") and help_text
        if typ is int:
            assert f"(default: {default})" in help_text
    # llama.cpp's defaults (common/common.h)
    assert (defaults.ngram_mod_n_match, defaults.ngram_mod_n_max, defaults.ngram_mod_n_min) == (24, 64, 48)
    assert (defaults.ngram_simple_size_n, defaults.ngram_simple_size_m, defaults.ngram_simple_min_hits) == (12, 48, 1)


def test_from_flags_accepts_flag_and_field_names():
    p = NgramParams.from_flags({
        "--spec-ngram-mod-n-max": "32", "spec-ngram-mod-n-min": 16, "spec_ngram_mod_n_match": 20,
        "ngram_map_k4v_min_hits": np.int64(3), "-lcs": "/tmp/static.bin",
    })
    assert (p.ngram_mod_n_max, p.ngram_mod_n_min, p.ngram_mod_n_match) == (32, 16, 20)
    assert p.ngram_map_k4v_min_hits == 3 and type(p.ngram_map_k4v_min_hits) is int
    assert p.lookup_cache_static == "/tmp/static.bin"
    assert NgramParams.from_flags({}) == NgramParams()


@pytest.mark.parametrize("flags, message", [
    ({"--spec-ngram-mod-n-max": 1025}, r"--spec-ngram-mod-n-max: must be between 0 and 1024 inclusive, got 1025"),
    ({"--spec-ngram-mod-n-min": -1}, r"--spec-ngram-mod-n-min: must be between 0 and 1024"),
    ({"--spec-ngram-mod-n-match": 0}, r"--spec-ngram-mod-n-match: must be between 1 and 1024"),
    ({"--spec-ngram-simple-size-n": 0}, r"--spec-ngram-simple-size-n: must be between 1 and 1024"),
    ({"--spec-ngram-map-k-size-m": 2000}, r"--spec-ngram-map-k-size-m: must be between 1 and 1024"),
    ({"--spec-ngram-map-k4v-min-hits": 0}, r"--spec-ngram-map-k4v-min-hits: must be at least 1"),
    ({"--spec-ngram-simple-min-hits": "two"}, r"--spec-ngram-simple-min-hits: expected an integer"),
    ({"--spec-ngram-map-k-size-n": True}, r"--spec-ngram-map-k-size-n: expected an integer"),
    ({"--spec-ngram-map-k-size-n": 2.5}, r"--spec-ngram-map-k-size-n: expected an integer"),
    ({"--lookup-cache-dynamic": 3}, r"--lookup-cache-dynamic: expected a path"),
    ({"--spec-ngram-size-n": 3}, r"unknown n-gram speculation option '--spec-ngram-size-n'"),
])
def test_from_flags_rejects(flags, message):
    with pytest.raises(ValueError, match=message):
        NgramParams.from_flags(flags)


def test_params_validate_on_construction():
    with pytest.raises(ValueError, match="--spec-ngram-mod-n-match"):
        NgramParams(ngram_mod_n_match=2000)


# --- cost -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_type", NGRAM_TYPES)
def test_draft_cost_on_8k_history(spec_type):
    """One draft per decode step with 8k tokens of history, default parameters: median under 0.2 ms. The
    last 200 tokens repeat an earlier passage, so every type finds long matches (ngram-mod chains 48+)."""
    seq = repetitive(random.Random(4), 8192, vocab=32000)
    seq += seq[1000:1200]
    d = make_ngram_drafter(spec_type, NgramParams())
    d.reset(seq[:8192])
    times, n_drafts = [], 0
    for i in range(8192, len(seq)):
        d.extend(seq[i:i + 1])
        t0 = time.perf_counter()
        out = d.draft(16)
        times.append(time.perf_counter() - t0)
        n_drafts += bool(out)
    median = statistics.median(times)
    print(f"{spec_type}: draft median {median * 1e6:.1f} us at 8k history ({n_drafts}/200 non-empty)")
    assert n_drafts > 0
    assert median < 0.2e-3
