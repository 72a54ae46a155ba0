"""MoE FFN figures: one decode token through moe_ffn against dense products streaming the same bytes.

Not a test (pytest does not collect it); run it alone on a quiet machine:

    python tests/bench_moe.py [--type Q8_0] [--n-embd 1024] [--n-ff 512] [--experts 64] [--used 8]
                              [--tokens 1]

A decode step of a MoE layer reads n_used of the n_expert experts (3 matrices each). The dense comparison is
the same bytes as ordinary matmuls: gate|up as one [2 n_used n_ff, n_embd] mat-vec and down as one
[n_embd, n_used n_ff] mat-vec (plus swiglu_fused: the dense SwiGLU FFN of the same size). The gap is what the
routing, the grouping and the expert-indexed grid cost. (With --tokens > 1 a step reads more experts than
n_used, so the dense rows are then a floor, not the same bytes.) Times are the median over 5 rounds of
back-to-back runs (tests/bench_matmul.py::time_launches).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_matmul import time_launches
from gguf import GGMLQuantizationType as T
from ops_testonly import upload_gate_up_experts
from test_matmul import random_weight

from nextn.cl.runtime import Runtime
from nextn.ops.elementwise import swiglu_fused
from nextn.ops.matmul import MatmulOps
from nextn.ops.moe import MoeBuffers, moe_ffn, upload_experts
from nextn.ops.weights import upload_weight


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-ff", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per step (the plan's max_tokens)")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    qtype = T[args.type]
    n_embd, n_ff, n_exp, n_used, n_tok = args.n_embd, args.n_ff, args.experts, args.used, args.tokens
    rt = Runtime()
    mm = MatmulOps(rt)
    rng = np.random.default_rng(0)
    print(f"device: {rt.describe()}")

    gate_inp = (rng.standard_normal((n_exp, n_embd)) / np.sqrt(n_embd)).astype(np.float32)
    d_inp = upload_weight(rt, gate_inp.view(np.uint8), T.F32, n_exp, n_embd, "bench.gate_inp")
    raws = [
        random_weight(qtype, n_exp * r, c, rng) for r, c in ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))
    ]
    exps = [
        upload_experts(rt, raw, qtype, n_exp, r, c, f"bench.{name}")
        for name, raw, r, c in zip(("gate", "up", "down"), raws, (n_ff, n_ff, n_embd), (n_embd, n_embd, n_ff))
    ]
    gate_up = upload_gate_up_experts(rt, raws[0], raws[1], qtype, n_exp, n_ff, n_embd, "bench.gate_up")
    cur = rt.upload(rng.standard_normal((n_tok, n_embd)).astype(np.float32), "bench.cur")
    x = rt.upload(np.zeros((n_tok, n_embd), np.float32), "bench.x")
    buf = MoeBuffers.allocate(rt, n_embd, n_ff, n_exp, n_used, n_tok)
    moe = moe_ffn(rt, mm, cur, x, d_inp, *exps, n_exp, n_used, 0.0, buf, n_tok)
    buf_f = MoeBuffers.allocate(rt, n_embd, n_ff, n_exp, n_used, n_tok)
    moe_fused = moe_ffn(rt, mm, cur, x, d_inp, gate_up, None, exps[2], n_exp, n_used, 0.0, buf_f, n_tok)
    used_bytes = sum(w.nbytes for w in exps) * n_used // n_exp

    # the same bytes as dense weights
    gu = upload_weight(
        rt,
        random_weight(qtype, 2 * n_used * n_ff, n_embd, rng),
        qtype,
        2 * n_used * n_ff,
        n_embd,
        "bench.dense_gate_up",
    )
    down = upload_weight(
        rt, random_weight(qtype, n_embd, n_used * n_ff, rng), qtype, n_embd, n_used * n_ff, "bench.dense_down"
    )
    gu_out = rt.alloc(4 * n_tok * 2 * n_used * n_ff, "bench.gu")
    # initialized: an uninitialized buffer may hold denormals, which make a CPU's FMAs many times slower
    act = rt.upload(rng.standard_normal((n_tok, n_used * n_ff)).astype(np.float32), "bench.act")
    dense_mm = mm.matmul(gu, cur, gu_out, n_tok) + mm.matmul(down, act, x, n_tok, accumulate=True)
    dense_ffn = dense_mm[:1] + swiglu_fused(rt, gu_out, act, n_used * n_ff) + dense_mm[1:]

    ids = [i for i, launch in enumerate(moe) if launch.name.startswith("matmul_id")]
    rows = [
        ("moe_ffn (all launches)", moe),
        ("  its matmul_id launches only", [moe[i] for i in ids]),
        (
            "  its other launches (router, sort, gather, swiglu, combine)",
            [m for i, m in enumerate(moe) if i not in ids],
        ),
        ("moe_ffn, gate|up fused on upload (upload_gate_up_experts)", moe_fused),
        ("dense gate|up + down matmuls, same bytes", dense_mm),
        ("dense SwiGLU FFN (+ swiglu_fused), same bytes", dense_ffn),
    ]
    print(
        f"{qtype.name} n_embd={n_embd} n_ff_exp={n_ff} experts={n_exp} used={n_used} tokens={n_tok}: "
        f"{used_bytes / 1e6:.1f} MB of expert weights per token"
    )
    for name, launches in rows:
        med, best = time_launches(rt, launches, n_tok, args.repeats)
        print(
            f"  {name:62s} {med * 1e3:7.3f} ms (best {best * 1e3:6.3f})  {len(launches):2d} launches"
            f"  {used_bytes / med / 1e9:5.1f} GB/s of used expert bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
