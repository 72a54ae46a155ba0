"""`nextn` command line: serve, chat, complete, config, generate, tokenize, inspect, make-tiny, bench."""

import argparse
import json
import sys

from nextn.errors import NextnError

# the random bench models' architectures: nextn.devtools.bench.BENCH_MODELS (not imported here: it loads
# pyopencl; tests/test_bench.py checks the two agree)
BENCH_ARCHS = ("qwen3", "qwen35", "qwen35moe", "glm4moe", "step35")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nextn")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="path to a GGUF model file (default: the embedded default model, a small Python code model)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: min(train, 4096))")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per prompt-processing step")
    p.add_argument("--device", default=None, help="OpenCL device: index or name substring (default: first GPU, else CPU)")
    p.add_argument("--platform", default=None, help="OpenCL platform: index or name substring")
    from nextn.config import KV_CACHE_TYPES

    for part in "kv":
        p.add_argument(f"-ct{part}", f"--cache-type-{part}", default=None, choices=KV_CACHE_TYPES,
                       help=f"KV cache type of {part.upper()} (default: f16)")


def _generate_config(args):
    """`nextn generate`'s flags as a configuration (one slot; no system files: the command line says all)."""
    from nextn import config

    flags = {"model.batch_size": (args.batch_size, "--batch-size"), "server.parallel": (1, "generate")}
    if args.model is not None:
        flags["model.path"] = (str(args.model), "--model")
    flags.update({k: v for k, v in _overrides(args).items() if k.startswith("speculative.")})
    if args.ctx_size is not None:
        flags["model.ctx_size"] = (args.ctx_size, "--ctx-size")
    for part in "kv":
        if getattr(args, f"cache_type_{part}") is not None:
            flags[f"model.cache_type_{part}"] = (getattr(args, f"cache_type_{part}"), f"--cache-type-{part}")
    for key in ("device", "platform"):
        if getattr(args, key) is not None:
            flags[f"device.{key}"] = (str(getattr(args, key)), f"--{key}")
    return config.load(None, flags, system=False)


def cmd_generate(args) -> int:
    from nextn.build import build
    from nextn.generate import GenerationStats, generate
    from nextn.sampling import SamplingParams

    cfg = _generate_config(args)
    if args.model is None:
        from nextn.default_model import describe

        print(f"nextn generate: {describe(cfg)}", file=sys.stderr)
    engine = build(cfg, progress=sys.stderr.isatty(), warm_up=False)
    params = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed,
    )
    tok = engine.runner.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special=False, parse_special=True)
    else:  # as llama-cli / llama-completion: special tokens written in the prompt become their ids
        ids = tok.encode(args.prompt, add_special=True, parse_special=not args.no_parse_special)
    stats = GenerationStats()
    engine.scheduler.start()
    try:
        for piece in generate(engine.scheduler, ids, args.n_predict, params, stop=args.stop or (),
                              ignore_eos=args.ignore_eos, stats=stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        engine.scheduler.drain(0)
    sys.stdout.write("\n")
    spec = ""
    if engine.spec.enabled:
        rate = f" ({stats.accepted / stats.drafted:.0%})" if stats.drafted else ""
        spec = f" | {','.join(engine.spec.types)}: drafted {stats.drafted}, accepted {stats.accepted}{rate}"
    print(
        f"prompt: {stats.n_prompt} tokens, {stats.prompt_tps:.1f} tok/s | decode: {stats.n_generated} tokens, "
        f"{stats.decode_tps:.1f} tok/s{spec} | stop: {stats.stop_reason}",
        file=sys.stderr,
    )
    return 0


def cmd_tokenize(args) -> int:
    from nextn.gguf.model_file import ModelFile
    from nextn.tokenizer import Tokenizer

    from nextn import default_model

    tok = Tokenizer.from_metadata(ModelFile(args.model or default_model.path()).meta)
    print(json.dumps(tok.encode(args.text, add_special=not args.no_bos, parse_special=not args.no_parse_special)))
    return 0


def cmd_inspect(args) -> int:
    from nextn.memory.kv_cache import KVTypes
    from nextn.model_info import describe

    kv = KVTypes(args.cache_type_k, args.cache_type_v, args.cache_type_k, args.cache_type_v)
    print(describe(args.file, n_ctx=args.ctx_size, as_json=args.json, kv_types=kv))
    return 0


def cmd_make_tiny(args) -> int:
    from nextn.devtools.tiny import main as tiny_main

    try:
        return tiny_main(args.rest) or 0
    except ValueError as e:
        print(f"nextn: error: {e}", file=sys.stderr)
        return 2


def cmd_bench(args) -> int:
    from nextn.devtools.bench import main as bench_main

    return bench_main(args) or 0


# ---- settings flags: one per config key (engine/config.py), named as llama-server's where it has one

_SHORT = {"--model": "-m", "--ctx-size": "-c", "--batch-size": "-b", "--parallel": "-np", "--cache-type-k": "-ctk",
          "--cache-type-v": "-ctv", "--spec-draft-type-k": "-ctkd", "--spec-draft-type-v": "-ctvd"}


def _parse_bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off or true/false, got {text!r}")


def _add_config_flags(p: argparse.ArgumentParser, sections: tuple[str, ...] = ()) -> None:
    """One flag per configuration key (only the keys of `sections` when given: `generate` takes the
    speculative ones)."""
    from nextn import config

    if not sections:
        p.add_argument("--config", default=None, metavar="FILE",
                       help="TOML file read after /etc/nextn (see config/nextn.toml)")
    for dotted, f in config.iter_fields():
        flag = f.metadata["flag"]
        if not flag or sections and dotted.split(".")[0] not in sections:
            continue
        t = {"int": int, "float": float, "str": str, "bool": bool}[f.type] if isinstance(f.type, str) else f.type
        names = [flag] + ([_SHORT[flag]] if flag in _SHORT else [])
        extra = {"type": t}
        if t is bool:  # `--spec-default` alone means true, as in llama-server; `--spec-adaptive off` sets it
            extra = {"type": _parse_bool, "nargs": "?", "const": True}
        # value names, not argparse's CFG:SECTION.KEY dest
        extra["metavar"] = "on|off" if t is bool else dotted.split(".")[1].upper()
        p.add_argument(*names, dest="cfg:" + dotted, default=None, help=f"{f.metadata['doc']} [{dotted}]", **extra)
    if not sections:
        p.add_argument("--host", default=None, help="TCP host to listen on as well as the socket [server.tcp]")
        p.add_argument("--port", type=int, default=None, help="TCP port (with --host; default 8080) [server.tcp]")


def _overrides(args) -> dict:
    from nextn import config

    overrides = {}
    for name, value in vars(args).items():
        if name.startswith("cfg:") and value is not None:
            dotted = name[4:]
            overrides[dotted] = (value, config._field(dotted).metadata["flag"])
    given = vars(args)  # `generate` has no --host / --port
    if given.get("host") is not None or given.get("port") is not None:
        overrides["server.tcp"] = (f"{args.host or '127.0.0.1'}:{args.port or 8080}", "--host/--port")
    return overrides


def _load_config(args):
    from nextn import config

    return config.load(args.config, _overrides(args))


def cmd_config(args) -> int:
    from nextn import config

    if args.action == "check":
        config.load(args.file, system=False)
        print(f"{args.file}: ok")
        return 0
    print(config.show(_load_config(args)))
    return 0


def cmd_serve(args) -> int:
    from nextn.server.app import serve

    return serve(_load_config(args), reload_args=(args.config, _overrides(args)))


def cmd_chat(args) -> int:
    from nextn.server.client import chat_main

    return chat_main(args)


def cmd_complete(args) -> int:
    from nextn.server.client import complete_main

    return complete_main(args)


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None, help="server socket (default: as `nextn serve` picks it)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temp", type=float, default=None, help="temperature (default: the server's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextn", description="Local LLM server with MTP speculative decoding on OpenCL")
    p.add_argument("--version", action="version", version=f"nextn {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server on a Unix socket")
    _add_config_flags(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="interactive chat with a running server (streams; shows tok/s)")
    _add_client_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    co = sub.add_parser("complete", help="one completion from a running server, for scripts")
    _add_client_args(co)
    co.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    co.add_argument("--chat", action="store_true", help="send it as a chat message (chat template applies)")
    co.add_argument("--stop", action="append", help="stop string (repeatable)")
    co.add_argument("--json", action="store_true", help="print the whole JSON response")
    co.set_defaults(func=cmd_complete)

    cf = sub.add_parser("config", help="show the effective configuration or check a file")
    cfs = cf.add_subparsers(dest="action", required=True)
    show = cfs.add_parser("show", help="effective values and where each came from")
    _add_config_flags(show)
    chk = cfs.add_parser("check", help="validate one TOML file (exit 78 on error)")
    chk.add_argument("file")
    cf.set_defaults(func=cmd_config)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    g.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    g.add_argument("--no-parse-special", action="store_true",
                   help="keep special tokens written in the prompt (<|im_start|> ...) as text; by default they "
                        "become their token ids, as in llama-cli")
    _add_config_flags(g, sections=("speculative",))
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokenize", help="print the token ids of a text as a JSON list")
    t.add_argument("-m", "--model", default=None, help="GGUF whose vocabulary is used (default: the embedded "
                   "default model)")
    t.add_argument("text")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model asks for it")
    t.add_argument("--no-parse-special", action="store_true",
                   help="keep special tokens written in the text (<|im_start|> ...) as text; by default they become "
                        "their ids, as in llama-tokenize")
    t.set_defaults(func=cmd_tokenize)

    i = sub.add_parser("inspect", help="architecture, hparams, tensor types and memory needed of a GGUF file")
    i.add_argument("file")
    i.add_argument("-c", "--ctx-size", type=int, default=None)
    from nextn.config import KV_CACHE_TYPES

    for part in "kv":
        i.add_argument(f"-ct{part}", f"--cache-type-{part}", default="f16", choices=KV_CACHE_TYPES,
                       help=f"KV cache type of {part.upper()} the memory figures assume")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    mt = sub.add_parser("make-tiny", help="write a random tiny GGUF model from a seed (for tests)", add_help=False)
    mt.add_argument("rest", nargs=argparse.REMAINDER)
    mt.set_defaults(func=cmd_make_tiny)

    b = sub.add_parser("bench", help="measure prompt and decode speed against the memory-bandwidth bound")
    b.add_argument("-m", "--model", default=None, help="GGUF to measure (default: a random ~300M Q8_0 model of --arch)")
    b.add_argument("--arch", default=None, choices=BENCH_ARCHS,
                   help="architecture of the default random model (default: qwen3; qwen35 with --spec)")
    b.add_argument("--type", default="Q8_0", type=str.upper,
                   help="weight type of the default random model (any make-tiny --type; default Q8_0)")
    b.add_argument("--n-prompt", type=int, default=512)
    b.add_argument("--n-decode", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--spec", action="store_true",
                   help="measure speculative decoding instead: every draft type on a repetitive and a plain prompt, "
                        "and prompt processing with the MTP head on vs off (needs a model with an MTP block; "
                        "default model: --arch qwen35)")
    b.add_argument("--spec-n-max", type=int, default=4, help="draft length for --spec (default 4)")
    b.add_argument("--profile", action="store_true",
                   help="also time each kernel of one decode step (microseconds, bytes read, GB/s) and of "
                        "one --n-prompt-token prompt step")
    b.add_argument("--device", default=None)
    b.add_argument("--platform", default=None)
    b.set_defaults(func=cmd_bench, bench_command=None)
    _bench_subcommands(b)
    return p


def _bench_type(module: str, name: str, *extra):
    """An argparse type from nextn.devtools.bench (imported when used): its ValueError becomes argparse's
    message (`argument --config: unknown key 'n_mx' ... (did you mean n_max?)`)."""

    def parse(text):
        import importlib

        try:
            return getattr(importlib.import_module(f"nextn.devtools.bench.{module}"), name)(text, *extra)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _bench_subcommands(b) -> None:
    """`nextn bench throughput | spec | parallel` (docs/bench.md); options go after the subcommand."""
    positive = _bench_type("common", "positive_int")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-m", "--model", default=None,
                        help="GGUF to measure (default: a random ~300M Q8_0 model of --arch: qwen35 with its MTP "
                             "block when a configuration uses draft-mtp, else qwen3)")
    common.add_argument("--arch", default=None, choices=BENCH_ARCHS)
    common.add_argument("--type", default="Q8_0", type=str.upper, help="weight type of the default random model")
    common.add_argument("--config", action="append", metavar="TYPES[:KEY=VALUE,...]",
                        type=_bench_type("configs", "parse_config"),
                        help="a speculative configuration to measure, repeatable; e.g. none, draft-mtp, "
                             "draft-mtp:n_max=1..4,adaptive=off, ngram-mod,draft-mtp:n_max=3 (none is always "
                             "measured: the baseline of each speed-up). Keys: n_max, n_min, p_min, adaptive, "
                             "synth_rates (P0/P1/...), synth_len, draft_model, draft_vocab (FR-Spec), the ngram_* settings")
    common.add_argument("--one-load", action="store_true",
                        help="load the model once for all configurations (less memory; the baseline then runs "
                             "with the MTP block and rollback state loaded)")
    common.add_argument("-b", "--batch-size", type=int, default=None, help="tokens per step (default: serve's)")
    common.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    common.add_argument("--plot", metavar="PNG", default=None, help="plot tok/s (needs matplotlib)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--compare-llama-server", metavar="PATH", default=None,
                        help="also run the same requests against this llama-server binary on the same GGUF "
                             "(skipped, with the reason, when it is not found)")
    common.add_argument("--llama-server-args", metavar="ARGS", default="",
                        help="extra llama-server flags, one string (e.g. \"-t 2\")")
    common.add_argument("--device", default=None)
    common.add_argument("--platform", default=None)
    bs = b.add_subparsers(dest="bench_command", metavar="{throughput,spec,parallel}")

    t = bs.add_parser("throughput", parents=[common], help="llama-bench's pp / tg tests, tg after a prompt of depth D")
    t.add_argument("-p", "--n-prompt", type=_bench_type("common", "int_list"), default=[128, 512, 2048],
                   metavar="N,N,...", help="prompt sizes of the pp tests (default 128,512,2048)")
    t.add_argument("-n", "--n-gen", type=int, default=128,
                   help="tokens decoded by the tg tests (default 128; 0: no tg tests)")
    t.add_argument("-d", "--depth", type=_bench_type("common", "int_list"), default=[0], metavar="D,D,...",
                   help="run tg after a prompt of each depth (default 0), e.g. 0,4096,16384")
    t.add_argument("-r", "--repeats", type=positive, default=3, help="repeats of each test (default 3)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")

    sp = bs.add_parser("spec", parents=[common], help="the prompt suite per speculative configuration, "
                                                       "pred / draft / acc / rate / tok/s, speed-up over none")
    sp.add_argument("-n", "--n-predict", type=positive, default=192, help="tokens per prompt (default 192)")
    sp.add_argument("--prompts", type=_bench_type("spec", "prompt_names"), default=None, metavar="NAME,...",
                    help="a subset of the suite (code_python, code_cpp, explain_concept, summarize, qa_factual, "
                         "translation, creative_short, stepwise_math, long_code_review)")
    sp.add_argument("-r", "--repeats", type=positive, default=1, help="runs of the whole suite (default 1)")
    sp.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--ignore-eos", action="store_true", help="always generate --n-predict tokens")
    sp.add_argument("--no-warmup", dest="warmup", action="store_false", help="no untimed first request")

    pa = bs.add_parser("parallel", parents=[common], help="1, 2, 4, 8 concurrent requests: aggregate and "
                                                          "per-request tok/s")
    pa.add_argument("-c", "--concurrency", type=_bench_type("common", "int_list", 1), default=[1, 2, 4, 8],
                    metavar="N,N,...", help="numbers of concurrent requests (default 1,2,4,8)")
    pa.add_argument("-n", "--n-predict", type=positive, default=128, help="tokens per request (default 128)")
    pa.add_argument("--prompts", type=_bench_type("spec", "prompt_names"), default=None, metavar="NAME,...",
                    help="the suite's prompts the requests take in turn (default: all)")
    pa.add_argument("-r", "--repeats", type=positive, default=3, help="repeats of each level (default 3)")
    for sub in (t, sp, pa):
        sub.set_defaults(func=cmd_bench)


def main(argv=None) -> int:
    parser = build_parser()
    # make-tiny takes its own arguments, --help included (its parser is devtools'): pass them through
    args, extra = parser.parse_known_args(argv)
    if args.command == "make-tiny":
        args.rest = [*args.rest, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except NextnError as e:
        print(f"nextn: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
