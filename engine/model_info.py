"""`nextn inspect`: what a GGUF file holds and what loading it will cost, without touching a device."""

import dataclasses
import json
from collections import Counter

from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import KVCache
from nextn.models import architecture, dense
from nextn.runner import MAX_OUTPUTS


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def model_summary(path, n_ctx: int | None = None, n_batch: int = 512) -> dict:
    mf = ModelFile(path)
    arch = architecture(mf.arch, mf.path)
    hp = arch.hparams(mf)
    infos = dense.check_tensors(hp, mf)
    n_ctx = int(n_ctx or min(hp.n_ctx_train, 4096))
    n_params = sum(int(i.n_rows * i.n_cols) for i in infos.values())
    mem = {
        "weights": dense.weights_bytes(hp, infos),
        "kv_cache": KVCache.bytes_needed(hp.n_layer, 1, n_ctx, hp.n_head_kv, hp.head_dim),
        "activations": dense.StepBuffers.bytes_needed(hp, n_batch, min(MAX_OUTPUTS, n_batch)),
    }
    mem["total"] = sum(mem.values())
    return {
        "file": str(mf.path),
        "architecture": mf.arch,
        "name": mf.meta.get("general.name", ""),
        "parameters": n_params,
        "hparams": dataclasses.asdict(hp),
        "tensor_types": dict(Counter(i.qtype.name for i in infos.values())),
        "file_bytes": sum(i.nbytes for i in infos.values()),
        "tied_output": not mf.has("output.weight"),
        "tokenizer": {"model": mf.meta.get("tokenizer.ggml.model"), "pre": mf.meta.get("tokenizer.ggml.pre")},
        "n_ctx": n_ctx,
        "memory_bytes": mem,
    }


def describe(path, n_ctx: int | None = None, as_json: bool = False) -> str:
    s = model_summary(path, n_ctx)
    if as_json:
        return json.dumps(s, indent=2)
    hp = s["hparams"]
    lines = [
        f"file:         {s['file']}",
        f"architecture: {s['architecture']}  ({s['name']})",
        f"parameters:   {s['parameters'] / 1e6:.1f} M",
        "hparams:      " + ", ".join(f"{k}={v}" for k, v in hp.items()),
        "tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["tensor_types"].items())),
        f"output:       {'tied to token_embd' if s['tied_output'] else 'separate output.weight'}",
        f"tokenizer:    {s['tokenizer']['model']} (pre: {s['tokenizer']['pre']})",
        f"memory (ctx {s['n_ctx']}, 1 sequence, batch 512):",
    ]
    for k, v in s["memory_bytes"].items():
        lines.append(f"  {k:<12}{_mib(v):>14}")
    return "\n".join(lines)
