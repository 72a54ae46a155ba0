"""`nextn bench throughput`: llama-bench's tests through the server's scheduler.

ppN: a prompt of N random tokens, its prompt tok/s (timings.prompt_per_second). tgT @ dD: T tokens decoded
greedily after a prompt of D tokens (timings.predicted_per_second: T decode steps; the prompt is evaluated
once before the repeats and reused from the prompt cache, as llama-bench's depth is prepared outside the
timing). Each test runs --repeats times, the configurations interleaved (A B C A B C ...) so machine noise
hits them alike; reported as median, min and max.
"""

from __future__ import annotations

import numpy as np

from nextn.devtools.bench import common
from nextn.devtools.bench.common import fmt, ratio, summary
from nextn.errors import ConfigError


def tests_of(args) -> list[dict]:
    pp = [n for n in args.n_prompt if n > 0]
    depths = args.depth
    out = [{"name": f"pp{n}", "kind": "pp", "n_prompt": n, "n_gen": 0, "depth": 0} for n in pp]
    if args.n_gen > 0:
        out += [{"name": f"tg{args.n_gen}" + (f" @ d{d}" if d else ""), "kind": "tg", "n_prompt": 0,
                 "n_gen": args.n_gen, "depth": d} for d in depths]
    return out


def main(args) -> int:
    from nextn.devtools.bench.configs import parse_configs
    from nextn.devtools.bench.llama_server import start_or_skip
    from nextn.sampling import SamplingParams
    from nextn.scheduler import Request

    configs = parse_configs(args.config)
    tests = tests_of(args)
    if not tests:
        raise ConfigError("nothing to measure: give --n-prompt sizes or --n-gen > 0")
    needs_mtp = any("draft-mtp" in c.types for c in configs)
    path = common.model_path(args, needs_mtp)
    n_max = max([c.get("n_max", 3) for c in configs] + [0])
    n_ctx = max(max(t["n_prompt"] for t in tests), max(t["depth"] + t["n_gen"] for t in tests) + n_max) + 8
    if args.plot:
        from nextn.devtools.bench.plot import require

        require()
    h = common.Harness(args, path, configs, n_slots=1, n_ctx=n_ctx, one_load=args.one_load)
    llama = None
    try:
        llama, llama_info = start_or_skip(args, path, configs, n_slots=1, n_ctx=n_ctx)
        common.print_model_line(h)
        n_vocab = min(h.runner.n_vocab, 100000)
        rng = np.random.default_rng(args.seed)
        greedy = SamplingParams(temperature=0.0)
        depth_prompt = {t["depth"]: rng.integers(0, n_vocab, max(t["depth"], 1)).tolist()
                        for t in tests if t["kind"] == "tg"}
        values = {(t["name"], c.label): [] for t in tests for c in configs}
        llama_values = {k: [] for k in values}
        bar = common.progress(len(tests) * len(configs) * (args.repeats + 1), "throughput", not args.no_progress)
        for t in tests:  # the test's repeats together (a depth's prompt stays cached), configurations interleaved
            for rep in range(-1, args.repeats):  # -1: warm-up (and the depth prompt's evaluation), not counted
                for c in configs:
                    if t["kind"] == "pp":
                        prompt = rng.integers(0, n_vocab, t["n_prompt"]).tolist()
                        req = Request(prompt, 1, greedy, ignore_eos=True)
                        r = h.run(c, [req])[0]
                        v = r.timings["prompt_per_second"]
                    else:
                        prompt = depth_prompt[t["depth"]]
                        n = 1 if rep < 0 else t["n_gen"] + 1  # the first token comes from the prompt pass
                        r = h.run(c, [Request(prompt, n, greedy, ignore_eos=True)], keep_cache=True)[0]
                        v = r.timings["predicted_per_second"]
                    if rep >= 0:
                        values[t["name"], c.label].append(v)
                    if llama is not None:  # the same request, its warm-up too
                        lt = llama.complete(c, prompt, 1 if t["kind"] == "pp" else n, cache_prompt=t["kind"] == "tg",
                                            ignore_eos=True)
                        if rep >= 0:
                            llama_values[t["name"], c.label].append(
                                lt["prompt_per_second"] if t["kind"] == "pp" else lt["predicted_per_second"])
                    bar.update()
        bar.close()
    finally:
        h.close()
        if llama is not None:
            llama.close()
    rows, results = [], []
    for t in tests:
        for c in configs:
            s = summary(values[t["name"], c.label])
            row = {"test": t["name"], "kind": t["kind"], "n_prompt": t["n_prompt"], "n_gen": t["n_gen"],
                   "depth": t["depth"], "config": c.label, "tok_s": s}
            if llama is not None:
                ls = summary(llama_values[t["name"], c.label])
                row["llama_server"] = {"tok_s": ls, "ratio": ratio(s["median"], ls["median"])}
            results.append(row)
    base = {(r["test"]): r["tok_s"]["median"] for r in results if r["config"] == "none"}
    for r in results:
        r["vs_none"] = ratio(r["tok_s"]["median"], base.get(r["test"]))
    d = common.header("throughput", h, {"n_prompt": list(args.n_prompt), "n_gen": args.n_gen,
                                        "depth": list(args.depth), "repeats": args.repeats, "seed": args.seed}, configs)
    d["results"] = results
    d["llama_server"] = llama_info
    show_cfg = len(configs) > 1
    headers = ["model", "size", "params"] + (["config"] if show_cfg else []) + ["test", "t/s", "min", "max"]
    if show_cfg:
        headers.append("vs none")
    if llama is not None:
        headers += ["llama-server t/s", "ratio"]
    for r in results:
        s = r["tok_s"]
        m = d["model"]
        row = [m["arch"], common.human_bytes(m["size_bytes"]), common.human_count(m["n_params_matrices"])]
        row += [r["config"]] if show_cfg else []
        row += [r["test"], fmt(s["median"], ".2f"), fmt(s["min"], ".2f"), fmt(s["max"], ".2f")]
        if show_cfg:
            row.append(fmt(r["vs_none"], ".2f") + "x" if r["vs_none"] else "-")
        if llama is not None:
            row += [fmt(r["llama_server"]["tok_s"]["median"], ".2f"), fmt(r["llama_server"]["ratio"], ".2f")]
        rows.append(row)
    print(common.table(headers, rows, "lrr" + ("l" if show_cfg else "") + "l" + "r" * (len(headers) - 4 - show_cfg)))
    print(f"(median of {args.repeats}; tgN: N greedy decode steps after the prompt of depth dD)")
    common.print_llama_skip(d)
    common.write_json(args.json, d)
    if args.plot:
        from nextn.devtools.bench.plot import plot_throughput

        plot_throughput(d, args.plot)
    return 0

