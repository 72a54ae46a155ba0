"""`nextn bench` (no subcommand) and `nextn bench --spec`: prompt and decode speed, host time per step, and decode vs the memory-bandwidth bound.

Everything is measured in one process, side by side (these machines are shared and noisy): the same
model and prompt with the Cython plan and with the plain pyopencl plan, medians of several repeats.
"""

import statistics
import time
from pathlib import Path

import numpy as np

from nextn.cl.runtime import default_cache_dir
from nextn.errors import NextnError
from nextn.ops.weights import DeviceWeight

# Random ~300M-parameter models (Q8_0 unless --type says otherwise) with Qwen2's 151936-token vocabulary (tied
# head), one per architecture. A trained context of 32768 (metadata only) so that llama-server, which caps its
# context there, runs the depth tests (4096, 16384) side by side.
BENCH_MODELS = {
    "qwen3": dict(arch="qwen3", qtype="Q8_0", seed=0, n_embd=1024, n_layer=9, n_head=16, n_head_kv=8,
                  head_dim=128, n_ff=3072, n_ctx=32768, tied=True),
    # Qwen3.5's proportions at n_embd 1024: 3 linear layers per full one, 8 value / 4 key heads of 128,
    # partial RoPE over 64 of 128 dims
    "qwen35": dict(arch="qwen35", qtype="Q8_0", seed=0, n_embd=1024, n_layer=12, n_head=8, n_head_kv=2,
                   head_dim=128, n_rot=64, n_ff=3072, n_ctx=32768, tied=True, ssm_d_state=128, ssm_n_group=4,
                   ssm_dt_rank=8, mtp=True),
    "qwen35moe": dict(arch="qwen35moe", qtype="Q8_0", seed=0, n_embd=1024, n_layer=8, n_head=8, n_head_kv=2,
                      head_dim=128, n_rot=64, n_ff=3072, n_ctx=32768, tied=True, ssm_d_state=128, ssm_n_group=4,
                      ssm_dt_rank=8, n_expert=32, n_expert_used=4, n_ff_exp=512, n_ff_shexp=512),
    # GLM-4.5-Air's shape at n_embd 1024: one dense layer, then MoE layers of 32 experts (4 used) and a shared
    # expert, partial RoPE over half of each head, q/k/v biases, and the MTP block
    "glm4moe": dict(arch="glm4moe", qtype="Q8_0", seed=0, n_embd=1024, n_layer=4, n_head=8, n_head_kv=2,
                    head_dim=128, n_rot=64, n_ff=3072, n_ctx=32768, tied=True, n_expert=32, n_expert_used=4,
                    n_ff_exp=512, n_expert_shared=1, n_dense_lead=1, mtp=True),
    # Step-3.5-Flash's pattern at n_embd 1024: a dense full-attention layer, two sliding-window MoE layers, a
    # full MoE layer (16 experts, 4 used, a shared expert; 16 keep the three MoE MTP blocks within ~300M),
    # twice the query heads in sliding layers, and its three chained MTP blocks
    "step35": dict(arch="step35", qtype="Q8_0", seed=0, n_embd=1024, n_layer=4, n_head=8, n_head_kv=2,
                   head_dim=128, n_ff=3072, n_ctx=32768, tied=True, n_expert=16, n_expert_used=4, n_ff_exp=512,
                   n_ff_shexp=512, n_dense_lead=1, n_swa=512, mtp=True, n_nextn=3),
}
BENCH_ARCHS = tuple(BENCH_MODELS)


VOCAB = Path(__file__).resolve().parent.parent / "data" / "ggml-vocab-qwen2.gguf"  # package data (llama.cpp's test file)


def bench_model_path(arch: str = "qwen3", qtype: str = "Q8_0") -> Path:
    """The random bench model of `arch` (BENCH_MODELS) with its matrices in `qtype`, made once and cached."""
    from nextn.devtools.tiny import make_tiny

    if not VOCAB.exists():
        raise NextnError(f"{VOCAB} is missing: the bench models need it (reinstall nextn)")
    spec = {**BENCH_MODELS[arch], "qtype": qtype.upper()}
    tag = f"{arch}-{spec['n_layer']}l{'-mtp' if spec.get('mtp') else ''}" if arch != "qwen3" else "qwen3-300m"
    path = default_cache_dir().parent / "bench" / f"{tag}-{qtype.lower()}-seed0-c{spec['n_ctx'] // 1024}k.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        make_tiny(tmp, vocab=str(VOCAB), **spec)
        tmp.replace(path)
    return path


def unique_weights(runner) -> list:
    """Each device weight once (a tied output head is the embedding table itself)."""
    seen, out = set(), []
    for t in runner.weights.values():
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def decode_bytes_per_token(runner, n_past: int) -> int:
    """Bytes a decode step must read: every weight matrix once (the embedding table only for its one row,
    unless it is also the output head; of routed experts only the n_used chosen), the norms, the KV cache of
    n_past positions in its row types, and a linear-attention layer's state (read and written back)."""
    hp, w, cache = runner.hp, runner.weights, runner.cache
    total = 0
    for t in unique_weights(runner):
        if not isinstance(t, DeviceWeight):  # a float32 vector: a norm, a bias
            total += int(t.size)
        elif t is w["token_embd.weight"] and w["output.weight"] is not t:
            total += t.nbytes // t.n_rows
        else:
            n_expert = getattr(t, "n_expert", 0)  # upload_experts' weights carry their expert count
            total += t.nbytes * hp.n_expert_used // n_expert if n_expert else t.nbytes
    return total + cache.attention_read_bytes(n_past) + 2 * cache.recurrent_bytes_per_seq()


def _time_decode(runner, prompt, n_decode):
    """Greedy decode after `prompt`; returns per-step wall seconds and per-step host enqueue seconds."""
    top, _ = runner.eval(0, prompt, 0, want_logits=False)
    token, pos = int(top[-1]), len(prompt)
    plan = runner._plan(1)
    walls, hosts = [], []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        top, _ = runner.step([token], [pos], [0], [0])
        walls.append(time.perf_counter() - t0)
        token, pos = int(top[-1]), pos + 1
    # host time of one step: the plan's enqueue loop alone, the device queue drained before each timing
    from nextn.cl import plan as planmod

    for _ in range(n_decode):
        planmod.finish(runner.rt.queue)
        t0 = time.perf_counter()
        plan.run(runner._vars)
        hosts.append(time.perf_counter() - t0)
    planmod.finish(runner.rt.queue)
    return walls, hosts


def load(args, path: Path, n_ctx: int, spec_type: str = "none"):
    """The model loaded as `nextn serve` loads it (build.py), with one slot; spec_type draft-mtp loads the MTP
    block and the rollback state too."""
    from nextn import config
    from nextn.build import build

    flags = {"model.path": str(path), "model.ctx_size": n_ctx, "model.batch_size": args.n_prompt,
             "server.parallel": 1, "speculative.type": spec_type, "device.platform": args.platform or "",
             "device.device": args.device or ""}
    cfg = config.load(None, {k: (v, "nextn bench") for k, v in flags.items()}, system=False)
    return build(cfg, warm_up=False).runner


def main(args) -> int:
    if args.spec:
        return spec_main(args)
    from nextn.ops.bandwidth import measure_bandwidth

    path = Path(args.model) if args.model else bench_model_path(args.arch or "qwen3", args.type)
    t0 = time.perf_counter()
    runner = load(args, path, args.n_prompt + args.n_decode + 16)
    load_s = time.perf_counter() - t0
    rt = runner.rt
    n_params = sum(t.n_rows * t.n_cols * getattr(t, "n_expert", 1) for t in unique_weights(runner)
                   if isinstance(t, DeviceWeight))
    print(f"device:     {rt.describe()}")
    print(f"model:      {path.name}: {runner.file.arch}, {n_params / 1e6:.0f} M parameters in matrices, "
          f"{runner.memory.weights / 2**20:.0f} MiB weights; loaded in {load_s:.1f} s "
          f"({rt.builds_compiled} programs compiled, {rt.builds_cached} from cache)")
    bw = measure_bandwidth(rt)
    print(f"bandwidth:  {bw:.1f} GB/s (device copy kernel, read + write)")

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(runner.n_vocab, 100000), args.n_prompt).tolist()
    pp = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        runner.eval(0, prompt, 0, want_logits=False)
        pp.append(time.perf_counter() - t0)
    pp_tps = args.n_prompt / statistics.median(pp)
    print(f"prompt:     {args.n_prompt} tokens, {pp_tps:.1f} tok/s (median of {args.repeats})")

    bytes_tok = decode_bytes_per_token(runner, args.n_prompt + args.n_decode // 2)
    bound = bw * 1e9 / bytes_tok
    print(f"decode bound: {bytes_tok / 2**20:.1f} MiB read per token -> {bound:.1f} tok/s at {bw:.1f} GB/s")
    rows = []
    for native in (True, False):
        runner.use_native_plans(native)
        walls, hosts = [], []
        for _ in range(args.repeats):
            w, h = _time_decode(runner, prompt[:64], args.n_decode)
            walls += w
            hosts += h
        step = statistics.median(walls)
        # launches a decode step enqueues (a split attention's combine launch only runs at long contexts)
        n_run = sum(launch.runs(runner._vars) for launch in runner.launches[min(runner.launches)])
        rows.append((("cython" if native else "pyopencl"), 1.0 / step, statistics.median(hosts), n_run))
    runner.use_native_plans(True)
    print(f"{'plan':<10}{'decode tok/s':>14}{'of bound':>10}{'host us/step':>14}{'launches':>10}")
    for name, tps, host, n in rows:
        print(f"{name:<10}{tps:>14.1f}{tps / bound:>9.0%}{host * 1e6:>14.0f}{n:>10}")
    print(f"ratio cython/pyopencl decode: {rows[0][1] / rows[1][1]:.2f}x; host time per step: "
          f"{rows[1][2] / rows[0][2]:.1f}x less")
    if args.profile:
        from nextn.devtools.bench.profile import print_profile, profile_decode_step, profile_prompt_step

        print_profile(profile_decode_step(runner, prompt[:64]), bw, 1.0 / rows[0][1])
        print_profile(profile_prompt_step(runner, prompt), bw, args.n_prompt / pp_tps,
                      f"{args.n_prompt}-token prompt step")
    return 0


SPEC_BENCH_TYPES = ("none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache",
                    "draft-mtp", "ngram-mod,draft-mtp")


def spec_main(args) -> int:
    """`nextn bench --spec`: decode speed and acceptance of each speculative type on a repetitive and a plain
    prompt, and prompt processing with the MTP head kept in step vs without, through the scheduler (one slot),
    side by side in one process."""
    import queue as queuemod

    from nextn.sampling import SamplingParams
    from nextn.scheduler import Request, Scheduler
    from nextn.spec.ngram import NgramParams
    from nextn.spec.speculator import SpecConfig, parse_types

    path = Path(args.model) if args.model else bench_model_path(args.arch or "qwen35", args.type)
    runner = load(args, path, 2048, "draft-mtp")
    rt = runner.rt
    print(f"device:     {rt.describe()}")
    print(f"model:      {path.name} (random weights: acceptance shows the machinery, not a real model's)")
    tok = runner.tokenizer
    repetitive = tok.encode("The cat sat on the mat and looked at the door. " * 24, True, False)[: args.n_prompt]
    rng = np.random.default_rng(0)
    plain = rng.integers(0, min(runner.n_vocab, 100000), args.n_prompt).tolist()
    # the bench's own n-gram sizes: the defaults (12-token keys, 48-token ngram-mod chains) need real text
    ngram = NgramParams(ngram_simple_size_n=3, ngram_map_k_size_n=3, ngram_map_k4v_size_n=3, ngram_mod_n_match=8,
                        ngram_mod_n_min=2, ngram_mod_n_max=16)

    def run(spec, prompt, n_gen):
        sched = Scheduler(runner, 1, spec=spec)
        for i in range(runner.n_seq):
            sched.cache.forget(i)
        sched.start()
        q = queuemod.Queue()
        sched.submit(Request(list(prompt), n_gen, SamplingParams(temperature=0.0), ignore_eos=True, sink=q.put))
        while True:
            ev = q.get(timeout=600)
            if ev.kind == "done":
                sched.drain(0)
                return ev.timings
            if ev.kind == "error":
                sched.drain(0)
                raise ev.error

    print(f"prompt processing, {args.n_prompt} tokens through the scheduler (median of {args.repeats}):")
    pp = {}
    for name, spec in (("MTP off", SpecConfig()), ("MTP on", SpecConfig(types=("draft-mtp",)))):
        pp[name] = statistics.median(run(spec, plain, 1)["prompt_per_second"] for _ in range(args.repeats))
        print(f"  {name:<8}{pp[name]:>10.1f} tok/s")
    print(f"  MTP on / off: {pp['MTP on'] / pp['MTP off']:.2f}")
    print(f"decode, {args.n_decode} tokens greedy, n-max {args.spec_n_max} (adaptive off / on), median of "
          f"{args.repeats}:")
    print(f"{'type':<22}{'prompt':<12}{'tok/s':>8}{'accepted':>12}{'tok/s adapt':>13}{'chosen n':>10}")
    # a random model's greedy output repeats, so real drafts are all accepted: synthetic acceptance at fixed
    # rates (output not valid) shows what low acceptance costs and what the adaptive controller saves
    # (each draft accepted with probability r given the ones before it: unconditional rates r, r^2, ...)
    cases = [(name, ()) for name in SPEC_BENCH_TYPES] + [
        ("draft-mtp", tuple(r ** (i + 1) for i in range(args.spec_n_max))) for r in (0.5, 0.1)]
    for name, rates in cases:
        for label, prompt in (("repetitive", repetitive), ("plain", plain)):
            if rates and label == "repetitive":
                continue
            if rates:
                label = f"synth {rates[0]:.0%}"
            row = []
            for adaptive in (False, True):
                spec = SpecConfig(types=parse_types(name), n_max=args.spec_n_max, adaptive=adaptive, ngram=ngram,
                                  synth_rates=rates)
                ts = [run(spec, prompt, args.n_decode) for _ in range(args.repeats)]
                t = sorted(ts, key=lambda x: x["predicted_per_second"])[len(ts) // 2]
                row.append(t)
            fixed, adapt = row
            acc = f"{fixed['draft_n_accepted']}/{fixed['draft_n']}" if fixed["draft_n"] else "-"
            chosen = adapt.get("speculative", {}).get("draft_n_max_chosen", "-")
            print(f"{name:<22}{label:<12}{fixed['predicted_per_second']:>8.1f}{acc:>12}"
                  f"{adapt['predicted_per_second']:>13.1f}{chosen!s:>10}")
    return 0
