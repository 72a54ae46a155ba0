"""What the bench subcommands share: the model loaded as `nextn serve` loads it (build.py), one scheduler per
configuration, requests run through it, medians with min / max, tables, JSON, the progress bar."""

from __future__ import annotations

import json
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nextn.devtools.bench.configs import BenchConfig
from nextn.errors import NextnError

SCHEMA_VERSION = 1


def summary(values) -> dict:
    """Median, min and max of the repeats (and the values themselves)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def int_list(text: str, lo: int = 0) -> list[int]:
    """'0,4096,16384' -> [0, 4096, 16384] (each >= lo); ValueError naming what is wrong."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(x < lo for x in out):
        raise ValueError(f"expected comma-separated integers >= {lo}, got {text!r}")
    return out


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return v


def human_bytes(n: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f}"


def ratio(a, b):
    """a / b, None when either is missing or b is 0 (a ratio of the same run's two numbers)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def rate(accepted: int, drafted: int):
    return accepted / drafted if drafted else None


def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table (llama-bench's style): `align` has one 'l' or 'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in r] for r in rows]
    width = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(cols):
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cols, width, align, strict=True))
        return "| " + " | ".join(padded) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + (":" if a == "r" else "-") for w, a in zip(width, align, strict=True)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def progress(total: int, desc: str, enabled: bool = True):
    """tqdm on stderr (off when stderr is not a terminal, or with --no-progress)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=None if enabled else True,
                leave=False, dynamic_ncols=True)


def write_json(path: str | None, doc: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def model_path(args, needs_mtp: bool) -> Path:
    """--model, or the random ~300M bench model of --arch (qwen35 with its MTP block when a configuration
    drafts with it, else qwen3)."""
    if args.model:
        return Path(args.model)
    from nextn.devtools.bench.legacy import bench_model_path

    return bench_model_path(args.arch or ("qwen35" if needs_mtp else "qwen3"), args.type)


def file_has_mtp(path: Path) -> bool:
    from nextn.model_info import model_summary

    return model_summary(path)["mtp"] is not None


@dataclass
class Result:
    """One request's outcome: the scheduler's timings (llama-server's names) and what it generated."""

    timings: dict
    tokens: list[int]
    wall_s: float  # submit -> done, as a client sees it


def load_key(spec) -> str:
    """What a runner must load for `spec`, as a --spec-type that loads just that: the draft model, the MTP
    block (both with rollback state), rollback state alone (any speculation), or nothing."""
    if spec.uses_draft_model:
        return "draft-simple"
    if spec.uses_mtp:
        return "draft-mtp"
    return "ngram-mod" if spec.enabled else "none"


@dataclass
class _Loaded:
    engine: object  # build.Engine
    owner: object = None  # the scheduler whose prompt cache last described the runner's sequences


def _scheduler_class():
    """The server's Scheduler, with its device work - each step (the trunk, verification, rollback, the MTP
    catch-up) and admission (the prompt cache's prefix reuse) - under the harness's lock. Several
    schedulers share a runner here, and a worker may still finish the step that answered its last request
    (the MTP head catching up) while the next request goes to another scheduler: the lock keeps their
    device work, and the harness's cache resets, one at a time (on other runners too, so that trailing
    work is not timed in the next run). Uncontended, it costs a lock per step."""
    from nextn.scheduler import Scheduler

    class BenchScheduler(Scheduler):
        device_lock: threading.Lock

        def _step(self) -> None:
            with self.device_lock:
                super()._step()

        def _admit(self) -> None:
            with self.device_lock:
                super()._admit()

    return BenchScheduler


@dataclass
class Harness:
    """The model loaded once per kind of load the configurations need (plain; + rollback state; + the MTP
    block), or once for all (one_load), and one started scheduler per configuration, as `nextn serve
    --spec-type ...` would have. Requests go through Scheduler.submit like the server's."""

    args: object
    path: Path
    configs: list[BenchConfig]
    n_slots: int
    n_ctx: int  # per slot
    one_load: bool = False
    loads: dict = field(default_factory=dict)
    scheds: dict = field(default_factory=dict)  # config label -> (Scheduler, load key)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the schedulers' device work, one at a time

    def __post_init__(self):
        from nextn.build import build
        from nextn.spec.speculator import from_config

        self.base_spec = from_config(self._config("none").speculative)  # serve's defaults; --config overrides
        specs = {c.label: c.spec(self.base_spec) for c in self.configs}
        union: list[str] = []
        for c in self.configs:
            union += [t for t in c.types if t not in union]
        # a load is its --spec-type and the load-time settings (draft_vocab): configurations differing there
        # need runners of their own
        keys = {c.label: (",".join(union) or "none" if self.one_load else load_key(specs[c.label]),
                          c.load_settings()) for c in self.configs}
        draft_model = next((s.draft_model for s in specs.values() if s.draft_model), "")
        for key in dict.fromkeys(keys.values()):
            spec_type, settings = key
            cfg = self._config(spec_type, draft_model if "draft-simple" in spec_type else "", dict(settings))
            self.loads[key] = _Loaded(build(cfg, progress=False, warm_up=True))
        scheduler = _scheduler_class()
        for c in self.configs:
            loaded = self.loads[keys[c.label]]
            eng = loaded.engine
            s = scheduler(eng.runner, self.n_slots, max_queue=64, spec=specs[c.label], draft_runner=eng.draft)
            s.device_lock = self.lock
            s.start()
            self.scheds[c.label] = (s, keys[c.label])

    def _config(self, spec_type: str, draft_model: str = "", settings: dict | None = None):
        from nextn import config

        a = self.args
        flags = {"model.path": str(self.path), "model.ctx_size": self.n_ctx, "server.parallel": self.n_slots,
                 "speculative.type": spec_type, "device.platform": a.platform or "", "device.device": a.device or "",
                 **(settings or {})}
        if getattr(a, "batch_size", None):
            flags["model.batch_size"] = a.batch_size
        if draft_model:
            flags["speculative.draft_model"] = draft_model
        return config.load(None, {k: (v, "nextn bench") for k, v in flags.items()}, system=False)

    @property
    def runner(self):
        return next(iter(self.loads.values())).engine.runner

    def describe(self) -> dict:
        from nextn.devtools.bench.legacy import unique_weights
        from nextn.ops.weights import DeviceWeight

        r = self.runner
        n_params = sum(t.n_rows * t.n_cols * getattr(t, "n_expert", 1) for t in unique_weights(r)
                       if isinstance(t, DeviceWeight))
        return {"file": self.path.name, "path": str(self.path), "arch": r.file.arch,
                "size_bytes": int(r.memory.weights), "n_params_matrices": int(n_params), "device": r.rt.describe(),
                "n_vocab": r.n_vocab,
                "loads": len(self.loads), "n_slots": min(s.n_slots for s, _ in self.scheds.values()),
                "ctx_size": self.n_ctx,
                "batch_size": r.n_batch}

    def run(self, cfg: BenchConfig, requests: list, keep_cache: bool = False, timeout: float = 3600) -> list[Result]:
        """Submit `requests` (scheduler.Request without a sink) at once through cfg's scheduler and wait for
        all. Unless keep_cache (and this scheduler was the last to use its runner), every slot starts empty."""
        sched, key = self.scheds[cfg.label]
        loaded = self.loads[key]
        if not keep_cache or loaded.owner is not sched:
            with self.lock:  # no worker is in a step (one may still finish the one that answered)
                for slot in range(sched.n_slots):
                    sched.cache.forget(slot)
        loaded.owner = sched
        done: queue.Queue = queue.Queue()
        tokens: list[list[int]] = [[] for _ in requests]
        t0 = [0.0] * len(requests)
        for i, req in enumerate(requests):
            toks = tokens[i]

            def sink(ev, i=i, toks=toks):
                if ev.kind == "token":
                    toks.append(ev.token)
                else:
                    done.put((i, ev, time.perf_counter()))

            req.sink = sink
            t0[i] = time.perf_counter()
            sched.submit(req)
        out: list[Result | None] = [None] * len(requests)
        for _ in requests:
            try:
                i, ev, t = done.get(timeout=timeout)
            except queue.Empty:
                raise NextnError(f"bench: no answer from the scheduler in {timeout:.0f} s") from None
            if ev.kind == "error":
                raise ev.error
            out[i] = Result(ev.timings, tokens[i], t - t0[i])
        return out

    def close(self) -> None:
        for sched, _ in self.scheds.values():
            sched.drain(0)


def file_tokenizer(path: Path):
    """The model's tokenizer from its GGUF metadata alone (before loading: prompt lengths size the context)."""
    from nextn.gguf.model_file import ModelFile
    from nextn.tokenizer import Tokenizer

    return Tokenizer.from_metadata(ModelFile(path).meta)


def chat_ids(tokenizer, text: str) -> list[int]:
    """One user message through the model's chat template (ChatML when the file has none), as token ids."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special=False, parse_special=True)


def header(kind: str, h: Harness, settings: dict, configs: list[BenchConfig]) -> dict:
    return {"nextn_bench": SCHEMA_VERSION, "kind": kind, "model": h.describe(), "settings": settings,
            "configs": [{"label": c.label, "types": list(c.types), "params": {k: (list(v) if isinstance(v, tuple)
                                                                                  else v) for k, v in c.params},
                         "spec_type": ",".join(c.types) or "none"} for c in configs],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_llama_skip(doc: dict) -> None:
    """The reason --compare-llama-server was skipped (no binary), again under the results."""
    skipped = (doc.get("llama_server") or {}).get("skipped")
    if skipped:
        print(f"llama-server: skipped ({skipped})")


def print_model_line(h: Harness) -> None:
    d = h.describe()
    print(f"model: {d['file']} ({d['arch']}, {human_bytes(d['size_bytes'])} of weights, "
          f"{human_count(d['n_params_matrices'])} parameters in matrices), device: {d['device']}")
