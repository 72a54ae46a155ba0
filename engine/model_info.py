"""`nextn inspect`: what a GGUF file holds and what loading it will cost, without touching a device."""

import dataclasses
import json
from collections import Counter

from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVTypes
from nextn.models import architecture
from nextn.runner import MAX_OUTPUTS


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def model_summary(path, n_ctx: int | None = None, n_batch: int = 512, kv_types: KVTypes = F16_KV) -> dict:
    mf = ModelFile(path)
    arch = architecture(mf.arch, mf.path)
    hp = arch.hparams(mf)
    has_mtp = arch.mtp_in_file(hp, mf)
    infos = arch.check_tensors(hp, mf, has_mtp)
    n_ctx = int(n_ctx or min(hp.n_ctx_train, 4096))
    n_out = min(MAX_OUTPUTS, n_batch)
    n_params = sum(int(i.n_rows * i.n_cols) for i in infos.values())
    # memory without the MTP block (what a plain load allocates), and what loading it adds
    kv_types.check(hp.head_dim, mf.path.name)
    plan = arch.memory_plan(hp, infos, 1, n_ctx, n_batch, n_out, has_mtp, kv_types=kv_types)
    mem = {name: v for name, v in plan.items() if not name.startswith("mtp_")}
    mem["total"] = sum(mem.values())
    summary = {
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
        "kv_types": dataclasses.asdict(kv_types),
        "memory_bytes": mem,
        "mtp": None,
        "mtp_declared": arch.mtp_layers(hp) > 0,  # the metadata's nextn_predict_layers (tensors may be absent)
    }
    if has_mtp:
        names = arch.mtp_tensor_names(hp, infos)
        summary["mtp"] = {
            "layer": hp.n_layer,
            "blocks": arch.mtp_layers(hp),  # step35: several, drafting in a chain
            "tensors": len(names),
            "parameters": sum(int(infos[n].n_rows * infos[n].n_cols) for n in names),
            "own_embedding": any(n.endswith("nextn.embed_tokens.weight") for n in names),
            "own_head": any(n.endswith("nextn.shared_head_head.weight") for n in names),
            "memory_bytes": {"weights": plan.mtp_weights, "kv_cache": plan.mtp_kv_cache,
                             "activations": plan.mtp_activations,
                             "total": plan.mtp_weights + plan.mtp_kv_cache + plan.mtp_activations},
        }
    return summary


def describe(path, n_ctx: int | None = None, as_json: bool = False, kv_types: KVTypes = F16_KV) -> str:
    s = model_summary(path, n_ctx, kv_types=kv_types)
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
        f"memory (ctx {s['n_ctx']}, 1 sequence, batch 512, KV cache K {kv_types.k} V {kv_types.v}):",
    ]
    for k, v in s["memory_bytes"].items():
        lines.append(f"  {k:<16}{_mib(v):>14}")
    m = s["mtp"]
    if m is None and s["mtp_declared"]:
        lines.append("MTP block:    declared in the metadata, but its tensors are not in the file (a trunk-only "
                     "conversion): draft-mtp is unavailable")
    elif m is None:
        lines.append("MTP block:    none (speculation can use the n-gram drafters or a draft model)")
    else:
        shared = [part for part, own in (("embedding", m["own_embedding"]), ("head", m["own_head"])) if not own]
        where = f"layer {m['layer']}" if m["blocks"] == 1 else \
            f"layers {m['layer']}..{m['layer'] + m['blocks'] - 1} ({m['blocks']} blocks drafting in a chain)"
        lines.append(f"MTP block:    {where}, {m['tensors']} tensors, {m['parameters']:,} "
                     f"parameters" + (f" (shares the trunk's {' and '.join(shared)})" if shared else ""))
        lines.append("  loaded only when MTP drafting is asked for; it then adds:")
        for k, v in m["memory_bytes"].items():
            lines.append(f"  {k:<16}{_mib(v):>14}")
    return "\n".join(lines)
