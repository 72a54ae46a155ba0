"""Trains nextn's embedded default model: a small qwen35 (Qwen3.5 architecture) code model and its MTP block,
on the Python standard library's source, then writes it as GGUF.

    python3 tools/train/train.py WORK_DIR [--out engine/data/nextn-stdlib-qwen35-mtp.gguf] [--seed 0] ...

Stages (each cached in WORK_DIR, so an interrupted run resumes where it stopped; checkpoints every
--checkpoint steps):
 1. vocabulary: byte-level BPE (vocab.py) learned from the training files; the files tokenized, one
    <|endoftext|> between files; the training files cut at a few places after a space or a line break and
    each piece tokenized alone (--cut-rate: a prompt ending in "def " works, see encode_with_cuts).
 2. trunk: next-token cross-entropy on random windows of --ctx tokens (window starts drawn from a generator
    seeded by (seed, step), so a resumed run draws what an uninterrupted one would), AdamW, linear warm-up then
    cosine decay, a fixed number of steps.
 3. MTP block: the trunk frozen; the block learns from the trunk's own outputs (self-distillation): row p,
    from token p and the trunk's h_{p-1}, is trained towards the trunk's distribution and argmax at p (soft
    cross-entropy + cross-entropy on the argmax), which is what greedy verification accepts. A second draft
    step (token p from the block's own output at p - 1, attending to the first pass's keys below p and its
    own, as the engine's draft steps do) is trained the same way with half the weight.
 4. export (export.py): WORK_DIR/model.gguf in F16 (norms F32), copied to --out.

Held-out files (corpus.HELD_OUT) are never trained on; the trunk's loss and the MTP block's agreement with
the trunk's argmax on them are printed at the end and written to WORK_DIR/report.json. Needs torch (CPU) and
runs on the cores given by --threads; the same seed and thread count give the same weights.
"""

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
from export import export
from model import Qwen35, Shape
from tokenizers import Tokenizer
from vocab import train_vocab

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "engine" / "data" / "nextn-stdlib-qwen35-mtp.gguf"


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------- data


# a prompt ends where its user stopped typing, often after a space or a line break ("def ", "):\n"), and its
# last token is then a lone " " or "\n" that whole-file tokenization never puts before a word (the space goes
# with the word: " name"); a model that never saw one continues it as it would a double space. So the
# training files are cut at a few such points and each piece tokenized alone.
CUT_AT = re.compile(r"(?<=[ \n])(?=\S)|(?<=\n)(?=[ \t])")


def encode_with_cuts(tok: Tokenizer, text: str, rng: np.random.Generator, rate: float) -> list[int]:
    """Token ids of text cut at a fraction `rate` of the places after a space or a line break, each piece
    tokenized alone."""
    cuts = [m.start() for m in CUT_AT.finditer(text)]
    cuts = [c for c, keep in zip(cuts, rng.random(len(cuts)) < rate) if keep]
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [t for enc in tok.encode_batch(pieces) for t in enc.ids]


def prepare_data(work: Path, n_vocab: int, seed: int, cut_rate: float):
    tok_path = work / "tokenizer.json"
    train_files, held_files = corpus.split()
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        log(f"vocabulary: {n_vocab} tokens from {len(train_files)} files of {corpus.python_version()}")
        tok = train_vocab((corpus.read(f) for f in train_files), n_vocab)
        tok.save(str(tok_path))
    arrays = {}
    eot = tok.token_to_id(corpus.EOT)
    for name, files in (("train", train_files), ("heldout", held_files)):
        path = work / f"{name}.npy"
        if not path.exists():
            ids = []
            for i, f in enumerate(tqdm(files, desc=f"tokenizing {name}", mininterval=5)):
                text = corpus.read(f)
                if name == "train":
                    ids.extend(encode_with_cuts(tok, text, np.random.default_rng([seed, 2, i]), cut_rate))
                else:
                    ids.extend(tok.encode(text).ids)  # measured as whole files
                ids.append(eot)
            np.save(path, np.asarray(ids, np.uint16))
        arrays[name] = np.load(path).astype(np.int64)
    log(f"corpus: {len(train_files)} files, {len(arrays['train'])} training tokens; held out "
        f"{len(held_files)} files, {len(arrays['heldout'])} tokens")
    return tok, arrays["train"], arrays["heldout"]


def batch(data: np.ndarray, seed: int, step: int, n_batch: int, ctx: int, stage: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, stage, step])
    starts = rng.integers(0, len(data) - ctx - 1, n_batch)
    return torch.from_numpy(np.stack([data[s : s + ctx + 1] for s in starts]))


def eval_windows(data: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    """n evenly spaced, fixed windows of the held-out tokens."""
    starts = np.linspace(0, len(data) - ctx - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[s : s + ctx + 1] for s in starts]))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


# ----------------------------------------------------------------------------------------------- stages


def run_stage(name: str, work: Path, model: Qwen35, params, steps: int, loss_fn, args, data):
    """AdamW over params for `steps` steps, checkpointed in WORK_DIR/{name}.pt (resumed from there)."""
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt = work / f"{name}.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"{name}: resumed at step {start}")
    if start >= steps:
        return
    stage = {"trunk": 0, "mtp": 1}[name]
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=10, smoothing=0.1)
    t0, ema = time.time(), None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        x = batch(data, args.seed, step, args.batch, args.ctx, stage)
        loss, shown = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = shown if ema is None else 0.95 * ema + 0.05 * shown
        tok_s = (step + 1 - start) * args.batch * args.ctx / (time.time() - t0)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if (step + 1) % args.checkpoint == 0 or step + 1 == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            log(f"{name}: step {step + 1}/{steps} loss {ema:.3f} ({tok_s:.0f} tok/s), checkpoint saved")


def trunk_loss(model: Qwen35):
    def fn(x):
        _, logits = model.trunk(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return loss, loss.item()

    return fn


def mtp_losses(model: Qwen35, x: torch.Tensor, second: bool):
    """(first-step loss, second-step loss or None, first-step agreement, second-step agreement)."""
    tokens = x[:, :-1]
    with torch.no_grad():
        h, t_logits = model.trunk(tokens)
        p = F.softmax(t_logits, dim=-1)
        top = t_logits.argmax(-1)

    def distill(logits, rows):
        lq = F.log_softmax(logits[:, rows], dim=-1)
        soft = -(p[:, rows] * lq).sum(-1).mean()
        hard = F.nll_loss(lq.reshape(-1, lq.shape[-1]), top[:, rows].reshape(-1))
        agree = (logits[:, rows].argmax(-1) == top[:, rows]).float().mean().item()
        return soft + hard, agree

    keep = []
    m1 = model.mtp_hidden(tokens, h, keep=keep)
    out1 = model.w("output.weight")
    l1, a1 = distill(m1 @ out1.T, slice(None))
    if not second:
        return l1, None, a1, None
    m2 = model.mtp_hidden(tokens, m1, kv_prev=keep[0])
    l2, a2 = distill(m2 @ out1.T, slice(1, None))  # row 0 has no first-pass output before it
    return l1, l2, a1, a2


def mtp_loss(model: Qwen35, second: bool):
    def fn(x):
        l1, l2, _, _ = mtp_losses(model, x, second)
        loss = l1 if l2 is None else l1 + 0.5 * l2
        return loss, l1.item()

    return fn


@torch.no_grad()
def evaluate(model: Qwen35, held: torch.Tensor, second: bool) -> dict:
    out = {"heldout_loss": 0.0, "mtp_agree_1": 0.0, "mtp_agree_2": 0.0}
    n = 0
    for i in range(0, len(held), 8):
        x = held[i : i + 8]
        _, logits = model.trunk(x[:, :-1])
        out["heldout_loss"] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
        if model.mtp:
            _, _, a1, a2 = mtp_losses(model, x, second)
            out["mtp_agree_1"] += a1
            out["mtp_agree_2"] += a2 or 0.0
        n += 1
    return {k: round(v / n, 4) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/train/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path, help="working directory: vocabulary, tokens, checkpoints, model.gguf")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the GGUF file is copied (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096, help="tokens in all (bytes, merges, <|endoftext|>)")
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-ff", type=int, default=512)
    p.add_argument("--full-attention-interval", type=int, default=1,
                   help="1: full attention only; 4: Qwen3.5's 3 Gated DeltaNet layers to 1 full attention")
    p.add_argument("--cut-rate", type=float, default=0.1,
                   help="fraction of the places after a space or line break where the training text is cut")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--trunk-steps", type=int, default=2400)
    p.add_argument("--mtp-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--second-step", type=int, default=1, help="1: also train the second draft step")
    p.add_argument("--checkpoint", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--type", default="F16", help="GGUF type of the matrices (F16, Q8_0, ...)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tok, train, held = prepare_data(work, args.vocab, args.seed, args.cut_rate)
    shape = Shape(n_vocab=tok.get_vocab_size(), n_embd=args.n_embd, n_layer=args.n_layer, n_ff=args.n_ff,
                  head_dim=args.head_dim,
                  full_attention_interval=args.full_attention_interval, n_ctx=args.ctx)
    model = Qwen35(shape, mtp=True, seed=args.seed)
    n_params = sum(t.numel() for t in model.parameters())
    log(f"model: {shape}, {n_params / 1e6:.2f}M parameters")
    held_w = eval_windows(held, args.ctx, args.eval_windows)

    mtp_prefix = f"blk.{shape.n_layer}."
    named = model.named_gguf()
    trunk_params = [t for k, t in named.items() if not k.startswith(mtp_prefix)]
    mtp_params = [t for k, t in named.items() if k.startswith(mtp_prefix)]
    run_stage("trunk", work, model, trunk_params, args.trunk_steps, trunk_loss(model), args, train)
    for t in trunk_params:
        t.requires_grad_(False)
    run_stage("mtp", work, model, mtp_params, args.mtp_steps, mtp_loss(model, bool(args.second_step)), args, train)

    report = evaluate(model, held_w, bool(args.second_step))
    report.update(steps={"trunk": args.trunk_steps, "mtp": args.mtp_steps}, params=n_params,
                  train_tokens=len(train), corpus=corpus.python_version(), minutes=round((time.time() - t_start) / 60, 1),
                  args={k: str(v) for k, v in vars(args).items()})
    (work / "report.json").write_text(json.dumps(report, indent=1))
    log(f"held-out: {json.dumps({k: report[k] for k in ('heldout_loss', 'mtp_agree_1', 'mtp_agree_2')})}")
    gguf_path = work / "model.gguf"
    export(model, tok, gguf_path, args.type)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gguf_path, args.out)
    log(f"wrote {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB){f' -> {args.out}' if args.out else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
