"""Gated DeltaNet kernel figures: delta_net (recurrent and chunked) and ssm_conv at Qwen3.5 layer sizes.

Not a test (pytest does not collect it); run it alone on a quiet machine:

    python tests/bench_delta_net.py [--tokens 512] [--hv 32] [--dk 128] [--dv 128] [--seqs 1]
                                    [--baseline DIR]

One linear-attention layer: n_k_heads = hv / 2, dk x dv state per value head. The batch holds --tokens
tokens split into --seqs equal contiguous runs (one slot per run), as the scheduler's continuous batching
lays them out. With --baseline DIR the same launches are also built from the kernel sources in DIR (a
copy of engine/kernels taken before a change) and the two are timed in alternating rounds in one
process, so the ratio is fair on a shared machine; the ratio of the best rounds is printed too (on a
shared machine other processes only ever add time). Times are the median over the rounds of back-to-back
runs (tests/bench_matmul.py::time_launches); the state is updated in place by every run, which keeps it
bounded (the decays are < 1), so repeated runs cost the same. On this 2-core PoCL machine the ratio moves
by up to 8% from one invocation to the next even for identical kernels (the rounds within one agree to
2-3%): run it more than once before calling a difference.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_matmul import time_launches
from nextn.cl.runtime import Runtime
from nextn.ops import delta_net as dn
from test_ops_delta_net import make_inputs


def build(rt, args, rng):
    """{name: (launches, buffers kept alive)} for one runtime (its kernel directory)."""
    hk, hv, dk, dv, n, ks = args.hv // 2, args.hv, args.dk, args.dv, args.tokens, 4
    qkv, g, beta, state = make_inputs(rng, n, hk, hv, dk, dv, n_seq=args.seqs)
    seq = np.repeat(np.arange(args.seqs, dtype=np.int32), -(-n // args.seqs))[:n]
    bufs = {name: rt.upload(a, f"bench.{name}") for name, a in
            (("qkv", qkv), ("g", g), ("beta", beta), ("state", state), ("seq", seq))}
    bufs["out"] = rt.alloc(4 * n * hv * dv, "bench.out")
    out = {}
    for form in filter(None, args.forms.split(",")):
        out[f"delta_net {form}"] = dn.delta_net(rt, bufs["qkv"], bufs["g"], bufs["beta"], bufs["state"],
                                                bufs["out"], bufs["seq"], hk, hv, dk, dv, n, form=form)
    ch = 2 * hk * dk + hv * dv
    bufs["x"] = rt.upload(rng.standard_normal((n, ch)).astype(np.float32), "bench.x")
    bufs["w"] = rt.upload(rng.standard_normal((ch, ks)).astype(np.float32), "bench.w")
    bufs["conv"] = rt.alloc(dn.conv_state_bytes(args.seqs, ch, ks), "bench.conv")
    out["ssm_conv"] = dn.ssm_conv(rt, bufs["x"], bufs["x"], bufs["w"], bufs["conv"], bufs["seq"], ch, ks, n)
    return out, bufs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seqs", type=int, default=1, help="sequences (contiguous runs) in the batch")
    ap.add_argument("--hv", type=int, default=32, help="value heads (k heads: half of them)")
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--forms", default="recurrent,chunked")
    ap.add_argument("--repeats", type=int, default=2, help="runs per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="a copy of engine/kernels to compare against")
    args = ap.parse_args(argv)
    runtimes = {"current": Runtime()}
    if args.baseline:
        runtimes["baseline"] = Runtime(kernel_dir=args.baseline)
    print(f"device: {runtimes['current'].describe()}; {args.tokens} tokens in {args.seqs} sequence(s), "
          f"{args.hv} v heads, dk={args.dk}, dv={args.dv}")
    built = {"current": build(runtimes["current"], args, np.random.default_rng(0))}
    if args.baseline:
        vector_width = dn._conv_vector_width
        if "VW" not in (args.baseline / "ssm_conv.cl").read_text():
            # kernels from before VW: one channel per work-item
            dn._conv_vector_width = lambda rt, channels: 1
        try:
            built["baseline"] = build(runtimes["baseline"], args, np.random.default_rng(0))
        finally:
            dn._conv_vector_width = vector_width
    times = {(k, name): [] for k in runtimes for name in built[k][0]}
    for r in range(args.rounds):
        for name in built["current"][0]:
            # both runtimes back to back, in turns first, so that both see the same machine load
            for k in list(runtimes)[::1 if r % 2 == 0 else -1]:
                sec = time_launches(runtimes[k], built[k][0][name], args.tokens, args.repeats, rounds=1)[0]
                times[(k, name)].append(sec)
    for name in built["current"][0]:
        line = f"{name:>20}: {np.median(times[('current', name)]) * 1e3:9.3f} ms"
        if args.baseline:
            base = np.median(times[("baseline", name)])
            cur = times[("current", name)]
            line += f"  baseline {base * 1e3:9.3f} ms  ratio {np.median(cur) / base:.3f}"
            line += f"  best-of ratio {min(cur) / min(times[('baseline', name)]):.3f}"
            # the per-round ratios show the noise of a shared machine
            line += "  (rounds: " + " ".join(f"{a / b:.2f}" for a, b in zip(times[("current", name)],
                                                                        times[("baseline", name)])) + ")"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
