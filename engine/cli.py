"""`nextn` command line: generate, tokenize, inspect, make-tiny, bench."""

import argparse
import json
import sys

from nextn.errors import NextnError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="path to a GGUF model file")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: min(train, 4096))")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per prompt-processing step")
    p.add_argument("--device", default=None, help="OpenCL device: index or name substring (default: first GPU, else CPU)")
    p.add_argument("--platform", default=None, help="OpenCL platform: index or name substring")


def _device_choice(args):
    from nextn.cl.runtime import DeviceChoice

    def sel(v):
        return int(v) if v is not None and str(v).isdigit() else v

    return DeviceChoice(platform=sel(args.platform), device=sel(args.device))


def _load(args, progress=True):
    from nextn.cl.runtime import Runtime
    from nextn.runner import ModelRunner

    rt = Runtime(_device_choice(args))
    return ModelRunner(args.model, rt=rt, n_ctx=args.ctx_size, n_batch=args.batch_size, progress=progress)


def cmd_generate(args) -> int:
    from nextn.generate import GenerationStats, generate
    from nextn.sampling import SamplingParams

    runner = _load(args, progress=sys.stderr.isatty())
    params = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed,
    )
    tok = runner.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special=False, parse_special=True)
    else:
        ids = tok.encode(args.prompt, add_special=True, parse_special=False)
    stats = GenerationStats()
    for piece in generate(runner, ids, args.n_predict, params, stop=args.stop or (), stats=stats, ignore_eos=args.ignore_eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"prompt: {stats.n_prompt} tokens, {stats.prompt_tps:.1f} tok/s | decode: {stats.n_generated} tokens, "
        f"{stats.decode_tps:.1f} tok/s | stop: {stats.stop_reason}",
        file=sys.stderr,
    )
    return 0


def cmd_tokenize(args) -> int:
    from nextn.gguf.model_file import ModelFile
    from nextn.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(ModelFile(args.model).meta)
    print(json.dumps(tok.encode(args.text, add_special=not args.no_bos, parse_special=args.parse_special)))
    return 0


def cmd_inspect(args) -> int:
    from nextn.model_info import describe

    print(describe(args.file, n_ctx=args.ctx_size, as_json=args.json))
    return 0


def cmd_make_tiny(args) -> int:
    from nextn.tiny import main as tiny_main

    try:
        return tiny_main(args.rest) or 0
    except ValueError as e:
        print(f"nextn: error: {e}", file=sys.stderr)
        return 2


def cmd_bench(args) -> int:
    from nextn.bench import main as bench_main

    return bench_main(args) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextn", description="Local LLM server with MTP speculative decoding on OpenCL")
    sub = p.add_subparsers(dest="command", required=True)

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
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokenize", help="print the token ids of a text as a JSON list")
    t.add_argument("-m", "--model", required=True)
    t.add_argument("text")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model asks for it")
    t.add_argument("--parse-special", action="store_true", help="turn special tokens written in the text into ids")
    t.set_defaults(func=cmd_tokenize)

    i = sub.add_parser("inspect", help="architecture, hparams, tensor types and memory needed of a GGUF file")
    i.add_argument("file")
    i.add_argument("-c", "--ctx-size", type=int, default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    mt = sub.add_parser("make-tiny", help="write a random tiny GGUF model from a seed (for tests)", add_help=False)
    mt.add_argument("rest", nargs=argparse.REMAINDER)
    mt.set_defaults(func=cmd_make_tiny)

    b = sub.add_parser("bench", help="measure prompt and decode speed against the memory-bandwidth bound")
    b.add_argument("-m", "--model", default=None, help="GGUF to measure (default: a random ~300M Q8_0 qwen3)")
    b.add_argument("--n-prompt", type=int, default=512)
    b.add_argument("--n-decode", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default=None)
    b.add_argument("--platform", default=None)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NextnError as e:
        print(f"nextn: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
