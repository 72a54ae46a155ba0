"""`nextn bench parallel`: N requests at once (default 1, 2, 4, 8) through the scheduler's continuous
batching, as N clients of `nextn serve --parallel 8` would send them.

Each request is a prompt of the suite (engine/devtools/data/spec_prompts.json, in turn) generating
--n-predict tokens (end of generation ignored, so every request does the same work). Per N: the aggregate
speed (all generated tokens over the wall time from the first submit to the last answer, prompts included)
and each request's own decode speed (timings.predicted_per_second); speed-up = aggregate / N=1's aggregate.
Repeats and configurations are interleaved; a row is the median-aggregate repeat.
"""

from __future__ import annotations

import time

from nextn.devtools.bench import common
from nextn.devtools.bench.common import fmt, ratio, summary


def measure(results: list[dict], wall_s: float) -> dict:
    """One run of N requests: results are each request's {"pred", "tok_s"}."""
    total = sum(r["pred"] for r in results)
    return {"n_requests": len(results), "total_predicted": total, "wall_s": wall_s,
            "aggregate_tok_s": total / wall_s if wall_s > 0 else None,
            "per_request_tok_s": summary([r["tok_s"] for r in results]),
            "drafted": sum(r["draft"] for r in results), "accepted": sum(r["acc"] for r in results)}


def _median_run(runs: list[dict]) -> dict:
    key = [r["aggregate_tok_s"] or 0.0 for r in runs]
    i = sorted(range(len(runs)), key=key.__getitem__)[(len(runs) - 1) // 2]
    return {**runs[i], "aggregate_tok_s_all": summary(key)}


def main(args) -> int:
    from nextn.devtools.bench.configs import parse_configs
    from nextn.devtools.bench.llama_server import start_or_skip
    from nextn.devtools.bench.spec import load_prompts
    from nextn.sampling import SamplingParams
    from nextn.scheduler import Request

    levels = sorted(set(args.concurrency))
    configs = parse_configs(args.config)
    prompts = load_prompts(args.prompts)
    path = common.model_path(args, any("draft-mtp" in c.types for c in configs))
    tok = common.file_tokenizer(path)
    ids = [common.chat_ids(tok, p["prompt"]) for p in prompts]
    n_max = max([c.get("n_max", 3) for c in configs] + [0])
    n_ctx = max(len(v) for v in ids) + args.n_predict + n_max + 8
    n_slots = max(levels)
    if args.plot:
        from nextn.devtools.bench.plot import require

        require()
    h = common.Harness(args, path, configs, n_slots=n_slots, n_ctx=n_ctx, one_load=args.one_load)
    llama, llama_info = None, {}
    greedy = SamplingParams(temperature=0.0)
    runs = {(c.label, n): [] for c in configs for n in levels}
    lruns = {k: [] for k in runs}
    try:
        llama, llama_info = start_or_skip(args, path, configs, n_slots, n_ctx)
        common.print_model_line(h)
        bar = common.progress(args.repeats * len(levels) * len(configs), "parallel", not args.no_progress)
        for c in configs:  # warm-up: every batch size's plan once, not timed
            h.run(c, [Request(ids[i % len(ids)], 4, greedy, ignore_eos=True) for i in range(n_slots)])
        for _ in range(args.repeats):
            for n in levels:
                for c in configs:
                    batch = [ids[i % len(ids)] for i in range(n)]
                    t0 = time.perf_counter()
                    res = h.run(c, [Request(b, args.n_predict, greedy, ignore_eos=True) for b in batch])
                    wall = time.perf_counter() - t0
                    runs[c.label, n].append(measure(
                        [{"pred": r.timings["predicted_n"], "tok_s": r.timings["predicted_per_second"],
                          "draft": r.timings["draft_n"], "acc": r.timings["draft_n_accepted"]} for r in res], wall))
                    if llama is not None:
                        lres, lwall = llama.complete_many(c, batch, args.n_predict, ignore_eos=True)
                        lruns[c.label, n].append(measure(
                            [{"pred": r["predicted_n"], "tok_s": r["predicted_per_second"], "draft": r["draft_n"],
                              "acc": r["draft_n_accepted"]} for r in lres], lwall))
                    bar.update()
        bar.close()
    finally:
        h.close()
        if llama is not None:
            llama.close()
    results = build_results(configs, levels, runs, lruns if llama is not None else None)
    doc = common.header("parallel", h, {"concurrency": levels, "n_predict": args.n_predict,
                                        "repeats": args.repeats, "prompts": [p["name"] for p in prompts]}, configs)
    doc["results"] = results
    doc["llama_server"] = llama_info
    print_results(doc)
    common.write_json(args.json, doc)
    if args.plot:
        from nextn.devtools.bench.plot import plot_parallel

        plot_parallel(doc, args.plot)
    return 0


def build_results(configs, levels, runs: dict, lruns: dict | None) -> list[dict]:
    out = []
    for c in configs:
        one = _median_run(runs[c.label, levels[0]])["aggregate_tok_s"]
        lone = _median_run(lruns[c.label, levels[0]])["aggregate_tok_s"] if lruns is not None else None
        for n in levels:
            m = _median_run(runs[c.label, n])
            row = {"config": c.label, "concurrency": n, **m, "speedup_vs_first": ratio(m["aggregate_tok_s"], one)}
            if lruns is not None:
                lm = _median_run(lruns[c.label, n])
                row["llama_server"] = {**lm, "speedup_vs_first": ratio(lm["aggregate_tok_s"], lone)}
                row["ratio_vs_llama_server"] = ratio(m["aggregate_tok_s"], lm["aggregate_tok_s"])
            out.append(row)
    none = {r["concurrency"]: r["aggregate_tok_s"] for r in out if r["config"] == "none"}
    for r in out:
        r["vs_none"] = ratio(r["aggregate_tok_s"], none.get(r["concurrency"]))
    return out


def print_results(doc: dict) -> None:
    llama = any("llama_server" in r for r in doc["results"])
    show_cfg = len({r["config"] for r in doc["results"]}) > 1
    first = doc["settings"]["concurrency"][0]
    headers = (["config"] if show_cfg else []) + ["requests", "agg tok/s", f"vs {first}"] + \
        (["vs none"] if show_cfg else []) + ["per-request tok/s", "min", "max"]
    if llama:
        headers += ["llama-server agg tok/s", "nextn/llama"]
    rows = []
    for r in doc["results"]:
        p = r["per_request_tok_s"]
        row = ([r["config"]] if show_cfg else []) + [
            r["concurrency"], fmt(r["aggregate_tok_s"], ".2f"), fmt(r["speedup_vs_first"], ".2f") + "x"] + (
            [fmt(r["vs_none"], ".2f") + "x"] if show_cfg else []) + [
            fmt(p["median"], ".2f"), fmt(p["min"], ".2f"), fmt(p["max"], ".2f")]
        if llama:
            row += [fmt(r["llama_server"]["aggregate_tok_s"], ".2f"), fmt(r["ratio_vs_llama_server"], ".2f")]
        rows.append(row)
    print(common.table(headers, rows, ("l" if show_cfg else "") + "r" * (len(headers) - show_cfg)))
    print(f"({doc['settings']['n_predict']} tokens per request; aggregate: all generated tokens over the wall "
          f"time, prompts included; median of {doc['settings']['repeats']})")
    common.print_llama_skip(doc)
