"""`nextn bench`: how fast the engine is, measured as users compare servers.

    nextn bench                 prompt / decode speed against the memory-bandwidth bound (legacy.py)
    nextn bench --spec          every draft type on a repetitive and a plain prompt (legacy.py)
    nextn bench throughput      llama-bench's pp / tg tests, tg after a prompt of depth D (throughput.py)
    nextn bench spec            the prompt suite, per prompt pred / draft / acc / rate / tok/s, several
                                configurations interleaved, speed-ups over none (spec.py)
    nextn bench parallel        1, 2, 4, 8 concurrent requests through the scheduler (parallel.py)

Every subcommand loads the model through build.py and runs requests through the scheduler, as `nextn serve`
does; --config (configs.py) names the speculative configurations, --compare-llama-server runs the same
requests against llama-server (llama_server.py), --json / --plot write the results (plot.py).
"""

from nextn.devtools.bench.legacy import BENCH_ARCHS, BENCH_MODELS, bench_model_path  # noqa: F401


def main(args) -> int:
    sub = getattr(args, "bench_command", None)
    if sub is None:
        from nextn.devtools.bench import legacy

        return legacy.main(args)
    if sub == "throughput":
        from nextn.devtools.bench.throughput import main as run
    elif sub == "spec":
        from nextn.devtools.bench.spec import main as run
    else:
        from nextn.devtools.bench.parallel import main as run
    return run(args)
