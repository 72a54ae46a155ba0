"""MTP acceptance and decode speed of a model on the held-out standard-library files (corpus.HELD_OUT), through
the server's own path (nextn.build + the scheduler with one slot, as `nextn generate`).

    python3 tools/train/measure.py [-m MODEL] [--windows 2] [--n-prompt 128] [-n 96] [--rounds 2] [--json FILE]

From each held-out file, --windows prompts of --n-prompt tokens (evenly spaced through the file) are
continued greedily for -n tokens (--ignore-eos), under each configuration: none (plain decoding), draft-mtp
with --spec-draft-n-max 1, 2, 3 and the adaptive controller off (a fixed draft length: acceptance per drafted
token), draft-mtp n-max 3 with the adaptive controller on, and n-max 1 drafting over the 2048 and 1024 most
frequent tokens only (--spec-draft-vocab, FR-Spec). Decode tok/s is all generated tokens over all
decode time; --rounds runs the configurations again in reverse order (the machine's load drifts) and sums.
Every configuration's greedy text must equal plain decoding's (it is checked). Needs no torch.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus

from nextn import config, default_model
from nextn.build import build
from nextn.generate import GenerationStats, generate
from nextn.sampling import SamplingParams

CONFIGS = {
    "none": {},
    "draft-mtp n-max 1": {"type": "draft-mtp", "draft_n_max": 1, "adaptive": False},
    "draft-mtp n-max 2": {"type": "draft-mtp", "draft_n_max": 2, "adaptive": False},
    "draft-mtp n-max 3": {"type": "draft-mtp", "draft_n_max": 3, "adaptive": False},
    "draft-mtp n-max 3 adaptive": {"type": "draft-mtp", "draft_n_max": 3, "adaptive": True},
    # FR-Spec: drafts over the most frequent tokens only (spec/draft_vocab.py): the acceptance it costs
    "draft-mtp n-max 1 vocab 2048": {"type": "draft-mtp", "draft_n_max": 1, "adaptive": False, "draft_vocab": 2048},
    "draft-mtp n-max 1 vocab 1024": {"type": "draft-mtp", "draft_n_max": 1, "adaptive": False, "draft_vocab": 1024},
}


def prompts(tok, n_windows: int, n_prompt: int) -> list[tuple[str, list[int]]]:
    out = []
    for f in corpus.HELD_OUT:
        ids = tok.encode(corpus.read(f), add_special=False)
        last = max(0, len(ids) - n_prompt)
        for w in range(n_windows):
            start = last * w // max(1, n_windows - 1) if n_windows > 1 else 0
            out.append((f"{f}@{start}", ids[start : start + n_prompt]))
    return out


def engine_for(model: str, spec: dict, ctx: int):
    flags = {"model.path": (model, "-m"), "server.parallel": (1, "measure"), "model.ctx_size": (ctx, "measure")}
    flags.update({f"speculative.{k}": (v, "measure") for k, v in spec.items()})
    return build(config.load(None, flags, system=False), progress=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/train/measure.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=str(default_model.path()))
    p.add_argument("--windows", type=int, default=2, help="prompts per held-out file")
    p.add_argument("--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-predict", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    engines = {name: engine_for(args.model, spec, args.n_prompt + args.n_predict + 8) for name, spec in CONFIGS.items()}
    tok = engines["none"].runner.tokenizer
    todo = prompts(tok, args.windows, args.n_prompt)
    totals = {name: {"generated": 0, "decode_s": 0.0, "drafted": 0, "accepted": 0} for name in CONFIGS}
    texts: dict[str, dict[str, list[int]]] = {name: {} for name in CONFIGS}
    params = SamplingParams(temperature=0.0)
    for e in engines.values():
        e.scheduler.start()
    try:
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                e, t = engines[name], totals[name]
                t0 = time.time()
                for label, ids in todo:
                    stats = GenerationStats()
                    for _ in generate(e.scheduler, ids, args.n_predict, params, ignore_eos=True, stats=stats):
                        pass
                    t["generated"] += stats.n_generated
                    t["decode_s"] += stats.n_generated / stats.decode_tps if stats.decode_tps else 0.0
                    t["drafted"] += stats.drafted
                    t["accepted"] += stats.accepted
                    texts[name].setdefault(label, stats.tokens)
                print(f"round {r + 1}: {name}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.scheduler.drain(0)

    base = totals["none"]["generated"] / totals["none"]["decode_s"]
    rows = []
    for name, t in totals.items():
        tps = t["generated"] / t["decode_s"]
        same = texts[name] == texts["none"]
        rows.append({"config": name, "decode_tok_s": round(tps, 1), "speedup": round(tps / base, 2),
                     "drafted": t["drafted"], "accepted": t["accepted"],
                     "acceptance": round(t["accepted"] / t["drafted"], 3) if t["drafted"] else None,
                     "greedy_output_as_none": same})
    print(f"model {args.model}: {len(todo)} prompts of {args.n_prompt} tokens from {len(corpus.HELD_OUT)} held-out "
          f"files, {args.n_predict} tokens each, {args.rounds} rounds")
    print(f"{'configuration':28} {'decode tok/s':>12} {'speed-up':>8} {'drafted':>8} {'accepted':>8} {'rate':>6}  same")
    for r in rows:
        rate = f"{r['acceptance']:.1%}" if r["acceptance"] is not None else "-"
        print(f"{r['config']:28} {r['decode_tok_s']:12.1f} {r['speedup']:7.2f}x {r['drafted']:8} {r['accepted']:8} "
              f"{rate:>6}  {'yes' if r['greedy_output_as_none'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["greedy_output_as_none"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
