"""`nextn bench spec`: the prompt suite users run against llama-server's MTP (code_python ... long_code_review,
engine/devtools/data/spec_prompts.json), per prompt `pred draft acc rate tok/s`, for several configurations
in one invocation, interleaved (prompt 1 under A B C, prompt 2 under A B C, ... and again per repeat), each
with its speed-up over `none` from the same run.

tok/s is timings.predicted_per_second (decode steps after the first token, as llama-server's); a prompt's
row is its median-speed repeat. The aggregate speed of a configuration is its decode steps over its decode
seconds summed over the prompts (median repeats); speed-up = that / none's.
"""

from __future__ import annotations

import json
from pathlib import Path

from nextn.devtools.bench import common
from nextn.devtools.bench.common import fmt, rate, ratio

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "spec_prompts.json"


def load_prompts(names: str | list[str] | None = None, path: Path = PROMPTS) -> list[dict]:
    """The suite ({"name", "prompt"}), or the (comma-separated) `names` of it in that order; ValueError for
    an unknown name."""
    suite = json.loads(path.read_text())["prompts"]
    if not names:
        return suite
    by_name = {p["name"]: p for p in suite}
    want = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    bad = [n for n in want if n not in by_name]
    if bad or not want:
        raise ValueError(f"unknown prompt(s) {', '.join(bad) or repr(names)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in want]


def prompt_names(text: str) -> list[str]:
    """--prompts NAME,NAME: checked against the suite."""
    return [p["name"] for p in load_prompts(text)]


def aggregate(rows: list[dict]) -> dict:
    """llama.cpp's benchmark aggregate (n_requests, total_predicted, total_draft, total_draft_accepted,
    aggregate_accept_rate, wall_s_total) and the decode speed over all prompts."""
    steps = sum(max(r["pred"] - 1, 0) for r in rows)
    secs = sum(r["decode_s"] for r in rows)
    drafted, accepted = sum(r["draft"] for r in rows), sum(r["acc"] for r in rows)
    return {"n_requests": len(rows), "total_predicted": sum(r["pred"] for r in rows), "total_draft": drafted,
            "total_draft_accepted": accepted, "aggregate_accept_rate": rate(accepted, drafted),
            "wall_s_total": sum(r["wall_s"] for r in rows), "decode_steps": steps, "decode_s": secs,
            "tok_s": steps / secs if secs > 0 else None}


def _row(name: str, results: list) -> dict:
    """A prompt's row from its repeats: the median-speed repeat's counts, and every repeat's speed."""
    speeds = [r["tok_s"] for r in results]
    med = sorted(results, key=lambda r: r["tok_s"])[(len(results) - 1) // 2]
    return {"name": name, "pred": med["pred"], "draft": med["draft"], "acc": med["acc"],
            "rate": rate(med["acc"], med["draft"]), "tok_s": med["tok_s"], "decode_s": med["decode_s"],
            "wall_s": med["wall_s"], "tok_s_all": common.summary(speeds), "tokens": med.get("tokens")}


def _from_timings(t: dict, wall_s: float, tokens=None) -> dict:
    return {"pred": int(t["predicted_n"]), "draft": int(t["draft_n"]), "acc": int(t["draft_n_accepted"]),
            "tok_s": float(t["predicted_per_second"]), "decode_s": float(t["predicted_ms"]) / 1e3,
            "wall_s": wall_s, "prompt_tok_s": float(t["prompt_per_second"]), "tokens": tokens}


def main(args) -> int:
    from nextn.devtools.bench.configs import parse_configs
    from nextn.devtools.bench.llama_server import start_or_skip
    from nextn.sampling import SamplingParams
    from nextn.scheduler import Request

    prompts = load_prompts(args.prompts)
    path = Path(args.model) if args.model else None
    if args.config:
        configs = parse_configs(args.config)
    else:
        if path is None:  # the default random model of --arch (qwen35 unless told otherwise)
            from nextn.devtools.bench.legacy import BENCH_MODELS

            has_mtp = bool(BENCH_MODELS[args.arch or "qwen35"].get("mtp"))
        else:
            has_mtp = common.file_has_mtp(path)
        configs = parse_configs(["draft-mtp:n_max=2/3"] if has_mtp else ["ngram-mod"])
    needs_mtp = any("draft-mtp" in c.types for c in configs)
    path = common.model_path(args, needs_mtp)
    if args.plot:
        from nextn.devtools.bench.plot import require

        require()
    tok = common.file_tokenizer(path)
    ids = {p["name"]: common.chat_ids(tok, p["prompt"]) for p in prompts}
    n_max = max([c.get("n_max", 3) for c in configs] + [0])
    n_ctx = max(len(v) for v in ids.values()) + args.n_predict + n_max + 8
    h = common.Harness(args, path, configs, n_slots=1, n_ctx=n_ctx, one_load=args.one_load)
    llama, llama_info = None, {}
    try:
        llama, llama_info = start_or_skip(args, path, configs, 1, n_ctx)
        common.print_model_line(h)
        params = SamplingParams(temperature=args.temp, seed=args.seed)
        runs = {(c.label, p["name"]): [] for c in configs for p in prompts}
        lruns = {k: [] for k in runs}
        bar = common.progress(args.repeats * len(prompts) * len(configs), "spec", not args.no_progress)
        if args.warmup:  # every kernel and plan once per configuration (and llama-server's), not timed
            for c in configs:
                h.run(c, [Request(ids[prompts[0]["name"]], 8, params, ignore_eos=True)])
                if llama is not None:
                    llama.complete(c, ids[prompts[0]["name"]], 8, temperature=args.temp, seed=args.seed,
                                   ignore_eos=True)
        for _ in range(args.repeats):
            for p in prompts:
                for c in configs:
                    req = Request(ids[p["name"]], args.n_predict, params, ignore_eos=args.ignore_eos)
                    r = h.run(c, [req])[0]
                    runs[c.label, p["name"]].append(_from_timings(r.timings, r.wall_s, r.tokens))
                    if llama is not None:
                        lt = llama.complete(c, ids[p["name"]], args.n_predict, temperature=args.temp,
                                            seed=args.seed, ignore_eos=args.ignore_eos)
                        lruns[c.label, p["name"]].append(_from_timings(lt, lt["wall_s"], lt["tokens"]))
                    bar.update()
        bar.close()
    finally:
        h.close()
        if llama is not None:
            llama.close()

    doc = common.header("spec", h, {"n_predict": args.n_predict, "repeats": args.repeats, "temp": args.temp,
                                    "seed": args.seed, "ignore_eos": args.ignore_eos,
                                    "prompts": [p["name"] for p in prompts]}, configs)
    doc["results"] = build_results(configs, prompts, runs, lruns if llama is not None else None, h.base_spec,
                                   greedy=args.temp <= 0)
    doc["llama_server"] = llama_info
    print_results(doc)
    common.write_json(args.json, doc)
    if args.plot:
        from nextn.devtools.bench.plot import plot_spec

        plot_spec(doc, args.plot)
    return 0


def build_results(configs, prompts, runs: dict, lruns: dict | None, base_spec, greedy: bool) -> list[dict]:
    """Per configuration: its per-prompt rows, aggregate, speed-up over none (and llama-server's side and
    the ratios when it ran), all from this run's numbers."""
    from nextn.devtools.bench.configs import n_max_of

    out = []
    for c in configs:
        rows = [_row(p["name"], runs[c.label, p["name"]]) for p in prompts]
        entry = {"config": c.label, "n_max": n_max_of(c, base_spec), "prompts": rows, "aggregate": aggregate(rows)}
        synthetic = c.spec(base_spec).synthetic
        if greedy and not synthetic and not c.is_none:  # lossless: greedy output must equal none's
            none_rows = [_row(p["name"], runs["none", p["name"]]) for p in prompts]
            entry["same_output_as_none"] = all(a["tokens"] == b["tokens"]
                                               for a, b in zip(rows, none_rows, strict=True))
        if lruns is not None:
            lrows = [_row(p["name"], lruns[c.label, p["name"]]) for p in prompts]
            entry["llama_server"] = {"prompts": lrows, "aggregate": aggregate(lrows)}
        out.append(entry)
    none = out[0]["aggregate"]["tok_s"]
    lnone = out[0]["llama_server"]["aggregate"]["tok_s"] if lruns is not None else None
    for e in out:
        e["speedup_vs_none"] = ratio(e["aggregate"]["tok_s"], none)
        if lruns is not None:
            la = e["llama_server"]["aggregate"]
            e["llama_server"]["speedup_vs_none"] = ratio(la["tok_s"], lnone)
            e["ratio_vs_llama_server"] = ratio(e["aggregate"]["tok_s"], la["tok_s"])
        for r in e["prompts"] + (e.get("llama_server", {}).get("prompts") or []):
            r.pop("tokens", None)  # compared above; not part of the report
    return out


def _prompt_line(r: dict) -> str:
    return (f"  {r['name']:<18} pred={r['pred']:4d} draft={r['draft']:4d} acc={r['acc']:4d} "
            f"rate={fmt(r['rate'], '.3f', 'n/a')} tok/s={r['tok_s']:.1f}")


def print_results(doc: dict) -> None:
    llama = any("llama_server" in e for e in doc["results"])
    for e in doc["results"]:
        sides = [("nextn", e)] + ([("llama-server", e["llama_server"])] if "llama_server" in e else [])
        for who, side in sides:
            up = side["speedup_vs_none"]
            print(f"\n{e['config']}" + (f" ({who})" if llama else "")
                  + (f"  (speed-up over none: {up:.2f}x)" if e["config"] != "none" and up else ""))
            for r in side["prompts"]:
                print(_prompt_line(r))
            keep = ("n_requests", "total_predicted", "total_draft", "total_draft_accepted", "aggregate_accept_rate",
                    "wall_s_total", "tok_s")
            a = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in side["aggregate"].items() if k in keep}
            print("Aggregate: " + json.dumps(a, indent=2))
        if "same_output_as_none" in e:
            print(f"greedy output identical to none: {'yes' if e['same_output_as_none'] else 'NO'}")
    print()
    headers = ["config", "n-max", "tok/s", "accept", "vs none"]
    if llama:
        headers += ["llama-server tok/s", "llama vs none", "nextn/llama"]
    rows = []
    for e in doc["results"]:
        a = e["aggregate"]
        row = [e["config"], e["n_max"], fmt(a["tok_s"], ".2f"), fmt(a["aggregate_accept_rate"], ".3f", "n/a"),
               fmt(e["speedup_vs_none"], ".2f") + "x"]
        if llama:
            la = e["llama_server"]
            row += [fmt(la["aggregate"]["tok_s"], ".2f"), fmt(la["speedup_vs_none"], ".2f") + "x",
                    fmt(e["ratio_vs_llama_server"], ".2f")]
        rows.append(row)
    print(common.table(headers, rows))
    common.print_llama_skip(doc)
