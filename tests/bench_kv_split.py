"""Decode speed at a long context with attention split over the KV (flash-decoding) and without.

Not a test (pytest does not collect it); run it alone on a quiet machine:

    python tests/bench_kv_split.py [MODEL.gguf] [--depth 4096] [--n-gen 32] [--rounds 5] [--slots 1]

One runner; after a prompt of --depth random tokens in each of --slots sequences, --n-gen greedy decode steps
(one token per slot per step) with KvSplit's mode "never", "always" and "auto", interleaved round by round so
machine noise hits them alike; medians of tok/s (all slots' tokens). The outputs are bit-identical in every
mode (tests/test_engine.py), so this is the whole of the trade: parallel groups against the combine launch.
Default model: the random ~300M qwen35 of `nextn bench` (2 kv heads: few groups without a split).
"""

import argparse
import statistics
import time

import numpy as np

from nextn.devtools.bench.legacy import bench_model_path
from nextn.runner import ModelRunner

MODES = ("never", "always", "auto")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--n-gen", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slots", type=int, default=1)
    a = p.parse_args()
    path = a.model or bench_model_path("qwen35")
    r = ModelRunner(path, n_ctx=a.depth + a.n_gen + 8, n_seq=a.slots, n_batch=512)
    sp = r.kv_split
    print(f"{path}: split {sp.size} positions, {sp.compute_units} compute units, {sp.min_groups} kv heads; "
          f"auto splits a step of {a.slots} at depth {a.depth} into {sp.count(a.slots, a.depth)}")
    rng = np.random.default_rng(0)
    first = []
    for s in range(a.slots):
        top, _ = r.eval(s, rng.integers(100, min(r.n_vocab, 5000), a.depth).tolist(), 0, want_logits=False)
        first.append(int(top[-1]))
        r.cache.snapshot(s)  # recurrent layers (qwen35) go back to it after each run
    speed = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            sp.mode = mode
            toks, pos = list(first), a.depth
            t0 = time.perf_counter()
            for _ in range(a.n_gen):
                top, _ = r.step(toks, [pos] * a.slots, list(range(a.slots)), list(range(a.slots)))
                toks, pos = [int(t) for t in top], pos + 1
            speed[mode].append(a.n_gen * a.slots / (time.perf_counter() - t0))
            for s in range(a.slots):
                r.cache.truncate(s, a.depth)
    base = statistics.median(speed["never"])
    for mode, v in speed.items():
        print(f"{mode:7s} {statistics.median(v):7.1f} tok/s ({min(v):.1f}-{max(v):.1f})  "
              f"{statistics.median(v) / base:.2f}x")


if __name__ == "__main__":
    main()
