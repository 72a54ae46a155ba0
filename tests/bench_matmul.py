"""Matmul kernel figures: mat-vec GB/s per weight type and prompt GFLOP/s, against the device copy roof.

Not a test (pytest does not collect it); run it alone on a quiet machine:

    python tests/bench_matmul.py [--types Q8_0,Q4_K] [--repeats 10]

For each type it measures the device copy bandwidth (the roof), then times a 151936x1024 mat-vec (a vocabulary-sized output head) and a 3072x1024 one (a
feed-forward matrix; 2-6 MB, so on a CPU it is read from cache, not memory), reporting the weight bytes
read per second, then the 512-token prompt product with a 1024x1024 weight in GFLOP/s (2 * rows * cols *
tokens per second). Times are the median over 5 rounds (the best round is printed too: on a shared machine
the median says what a user sees, the best what the kernel can do).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl as cl

sys.path.insert(0, str(Path(__file__).parent))
from gguf import GGMLQuantizationType as T
from nextn.cl.runtime import Runtime
from nextn.ops.bandwidth import copy_bandwidths
from nextn.cl.launch import N_VARS, VAR_N_OUTPUTS, VAR_N_TOKENS
from nextn.ops.matmul import MatmulOps
from nextn.ops.weights import SUPPORTED_TYPES, upload_weight
from test_matmul import random_weight


def time_launches(rt, launches, n_tokens: int, repeats: int, rounds: int = 5) -> tuple[float, float]:
    """(median, min) over `rounds` of the seconds per run of the launches, each round enqueueing `repeats`
    runs back to back and waiting once, as a step plan does (a lone launch waited on costs PoCL ~60 us of
    wake-up, more than a 3072x1024 mat-vec itself)."""
    v = [0] * N_VARS
    v[VAR_N_TOKENS] = v[VAR_N_OUTPUTS] = n_tokens
    for launch in launches:
        for arg, var in launch.dyn_args:
            launch.kernel.set_arg(arg, np.int32(v[var]))
    sizes = [(launch.kernel, launch.global_size(v), launch.local) for launch in launches]

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            for k, g, loc in sizes:
                cl.enqueue_nd_range_kernel(rt.queue, k, g, loc)
        rt.queue.finish()
        return (time.perf_counter() - t) / n

    run(1)  # warm-up: PoCL compiles the work-group function at the first launch
    times = [run(repeats) for _ in range(rounds)]
    return float(np.median(times)), float(np.min(times))


def bench_type(rt, mm, qtype, repeats: int, rng, roof: float) -> list[str]:
    lines = []
    for n_rows, n_cols in ((151936, 1024), (3072, 1024)):
        raw = random_weight(qtype, n_rows, n_cols, rng)
        w = upload_weight(rt, raw, qtype, n_rows, n_cols, "bench.w")
        x = rt.upload(rng.standard_normal(n_cols).astype(np.float32), "bench.x")
        y = rt.alloc(4 * n_rows, "bench.y")
        med, best = time_launches(rt, mm.matmul(w, x, y, 1), 1, repeats if n_rows > 10000 else 20 * repeats)
        gbs = w.nbytes / med / 1e9
        lines.append(
            f"  mat-vec {n_rows:6d}x{n_cols}: {med * 1e3:7.2f} ms  {gbs:5.1f} GB/s = {100 * gbs / roof:3.0f}% of copy"
            f"  (best {w.nbytes / best / 1e9:5.1f} GB/s)"
        )
        del w, x, y
    n_tokens = 512
    raw = random_weight(qtype, 1024, 1024, rng)
    w = upload_weight(rt, raw, qtype, 1024, 1024, "bench.w")
    x = rt.upload(rng.standard_normal((n_tokens, 1024)).astype(np.float32), "bench.x")
    y = rt.alloc(4 * n_tokens * 1024, "bench.y")
    med, best = time_launches(rt, mm.matmul(w, x, y, n_tokens), n_tokens, max(1, repeats // 5))
    flop = 2 * 1024 * 1024 * n_tokens
    lines.append(
        f"  prompt  {n_tokens} x 1024x1024: {med * 1e3:7.2f} ms  {flop / med / 1e9:6.1f} GFLOP/s"
        f"  (best {flop / best / 1e9:6.1f})"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--types", default=",".join(t.name for t in sorted(SUPPORTED_TYPES, key=lambda t: t.value))
    )
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    rt = Runtime()
    mm = MatmulOps(rt)
    rng = np.random.default_rng(0)
    print(f"device: {rt.describe()}")
    for name in args.types.split(","):
        qtype = T[name.strip().upper()]
        # the roof is measured again before each type: on a shared machine it moves from minute to minute
        roof = max(copy_bandwidths(rt, 256 << 20, 5).values())
        print(f"{qtype.name} (copy bandwidth now {roof:.1f} GB/s, read + write)")
        for line in bench_type(rt, mm, qtype, args.repeats, rng, roof):
            print(line, flush=True)


if __name__ == "__main__":
    main()
