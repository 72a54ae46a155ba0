"""The architecture contract: everything the runner needs from an architecture, as one typed interface.

An architecture (one file in engine/models/, one line in models/__init__.py's registry) subclasses
`Architecture` and provides, from a GGUF file's metadata and tensors:

- `hparams(mf)`: its hyperparameters, validated (a bad or missing key raises ModelLoadError naming it);
- `tensor_table(hp, mf, mtp)`: name -> (GGUF shape, allowed types) of every tensor it reads (the MTP
  block's too when mtp); the loader checks them all before uploading anything;
- `fusion_candidates(hp, mtp)`: weights read by one mat-vec when their types agree (Q|K|V, gate|up);
- `memory_plan(...)`: the device bytes of weights, caches and activations, checked before allocating;
- `upload(...)`: the device weights;
- `make_cache(...)`: its SequenceCache (engine/memory): KV, recurrent state, snapshots;
- `step_buffers(...)` and `build_step(...)`: the launches of one forward step over a batch.

Optional parts have defaults, never probes: an MTP (NextN) head (`mtp_layers(hp)` > 0 in files that ship
one, `build_mtp_step`), and a replay for rolling back recurrent layers (`build_replay`, None when the
cache rolls back by its lengths alone).

Step buffers: every architecture's buffers have the batch inputs `ids`, `pos`, `seq`, `out_idx` (int32 per
row) and the outputs `logits` / `argmax` of the out rows; an architecture with an MTP head also has `hidden`
(the trunk's final hidden state of every row, the MTP block's input) and `zero_row` (a row of it that stays
zero: the hidden state paired with position 0).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from nextn.cl.launch import Launch
from nextn.errors import ModelLoadError
from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.memory.sequence import SequenceCache
from nextn.models import blocks
from nextn.models.blocks import F32
from nextn.ops import moe
from nextn.ops.weights import SUPPORTED_TYPES, device_bytes, upload_weight

TensorTable = dict  # name -> (GGUF shape ne, frozenset of allowed GGMLQuantizationType)


class Architecture(ABC):
    """One architecture (or a family sharing its math, parameterized). Instances are stateless."""

    def __init__(self, name: str):
        self.name = name

    # -- the file -------------------------------------------------------------------------------------------

    @abstractmethod
    def hparams(self, mf: ModelFile):
        """Hyperparameters from the file's metadata (a frozen dataclass with at least n_vocab, n_embd,
        n_layer, n_head_kv, head_dim, n_ctx_train)."""

    @abstractmethod
    def tensor_table(self, hp, mf: ModelFile, mtp: bool) -> TensorTable:
        """Every tensor the step reads; the MTP block's as well when mtp."""

    def mtp_layers(self, hp) -> int:
        """MTP (NextN) blocks the file declares (0: none, or the architecture has none)."""
        return 0

    def check_tensors(self, hp, mf: ModelFile, mtp: bool = False) -> dict:
        """Validate every tensor (shape and type) before anything is uploaded; returns name -> TensorInfo."""
        if mtp and not self.mtp_layers(hp):
            if not self.has_mtp_head:
                raise ModelLoadError(
                    f"{mf.path}: MTP drafting was asked for, but architecture {mf.arch} has no MTP (nextn) block; "
                    f"use a model that has one ({', '.join(mtp_architectures())}) or another draft type")
            raise ModelLoadError(
                f"{mf.path}: MTP drafting was asked for, but this {mf.arch} file has no MTP block "
                f"({mf.arch}.nextn_predict_layers is 0 and there are no blk.{hp.n_layer}.nextn.* tensors); "
                f"use a GGUF converted with its MTP layers (e.g. a '-MTP' file) or another draft type")
        if mtp and not self.mtp_in_file(hp, mf):
            raise ModelLoadError(
                f"{mf.path}: MTP drafting was asked for; {mf.arch}.nextn_predict_layers declares an MTP block but "
                f"the file has no blk.{hp.n_layer}.nextn.* tensors (a trunk-only conversion); use a GGUF converted "
                f"with its MTP layers or another draft type")
        return {name: mf.tensor(name, ne, types) for name, (ne, types) in self.tensor_table(hp, mf, mtp).items()}

    def mtp_in_file(self, hp, mf: ModelFile) -> bool:
        """Whether the file holds the MTP block's tensors (llama.cpp's converter can leave them out while the
        metadata still declares the block)."""
        return self.mtp_layers(hp) > 0 and mf.has(f"blk.{hp.n_layer}.nextn.eh_proj.weight")

    def mtp_tensor_names(self, hp, infos: dict) -> list[str]:
        """The loaded tensors that belong to the MTP block (counted apart in memory and `nextn inspect`)."""
        prefix = f"blk.{hp.n_layer}."
        return [n for n in infos if n.startswith(prefix)] if self.mtp_layers(hp) else []

    # -- the device -----------------------------------------------------------------------------------------

    def fusion_candidates(self, hp, mtp: bool) -> list[tuple[str, list[str]]]:
        """(device name, file tensors) that the step reads as one row-concatenated weight when their types
        agree. Default: none."""
        return []

    def fused_groups(self, hp, infos: dict, mtp: bool) -> dict[str, list[str]]:
        return fused_groups(infos, self.fusion_candidates(hp, mtp))

    @abstractmethod
    def memory_plan(self, hp, infos: dict, n_seq: int, n_ctx: int, n_batch: int, max_outputs: int,
                    mtp: bool = False, rollback_rows: int = 0, kv_types: KVTypes = F16_KV) -> MemoryPlan: ...

    def group_bytes(self, infos: dict, name: str, members: list[str]) -> int:
        """Device bytes of one device weight (the file tensors `members`, fused under `name`): vectors as
        float32, routed experts tile-padded per expert, eh_proj as its two halves, other matrices in the tile
        layout. An architecture with other kinds of weights extends this and upload_weight_group."""
        first = infos[members[0]]
        if len(first.ne) == 1:
            return 4 * sum(infos[m].ne[0] for m in members)
        if is_experts(name):
            return moe.experts_bytes(first.qtype, first.ne[2], first.ne[1], first.ne[0])
        if blocks.is_eh_proj(name):
            return blocks.eh_proj_bytes(first)
        return device_bytes(first.qtype, sum(infos[m].n_rows for m in members), first.n_cols)

    def weights_bytes(self, hp, infos: dict, mtp: bool = False) -> tuple[int, int]:
        """(trunk bytes, MTP block bytes) of the weights on the device."""
        mtp_names = set(self.mtp_tensor_names(hp, infos)) if mtp else set()
        trunk = extra = 0
        for name, members in self.fused_groups(hp, infos, mtp).items():
            n = self.group_bytes(infos, name, members)
            if members[0] in mtp_names:
                extra += n
            else:
                trunk += n
        return trunk, extra

    def upload_weight_group(self, rt, mf: ModelFile, infos: dict, name: str, members: list[str], out: dict) -> None:
        """Put one device weight into `out` (the kinds of group_bytes)."""
        first = infos[members[0]]
        if is_experts(name):
            out[name] = moe.upload_experts(rt, np.asarray(mf.raw(first)).reshape(-1), first.qtype, first.ne[2],
                                           first.ne[1], first.ne[0], name)
        elif blocks.is_eh_proj(name):
            blocks.upload_eh_proj(rt, mf, first, name, out)
        else:
            out[name] = upload_group(rt, mf, infos, members, name)

    def upload(self, rt, hp, mf: ModelFile, infos: dict, progress=None, mtp: bool = False) -> dict:
        """Device weights by name (fused groups under their device name; a tied head shares the embedding)."""
        out = {}
        for name, members in self.fused_groups(hp, infos, mtp).items():
            self.upload_weight_group(rt, mf, infos, name, members, out)
            if progress is not None:
                progress(sum(infos[m].nbytes for m in members))
        if "output.weight" not in out:
            out["output.weight"] = out["token_embd.weight"]  # tied embeddings: the same device buffers
        return out

    @abstractmethod
    def make_cache(self, rt, hp, n_seq: int, n_ctx: int, mtp: bool = False, rollback_rows: int = 0,
                   kv_types: KVTypes = F16_KV, n_batch: int = 0) -> SequenceCache:
        """n_batch: the largest step (a sliding-window ring holds its window plus one step)."""

    @abstractmethod
    def step_buffers(self, rt, hp, max_tokens: int, max_outputs: int):
        """Device buffers of one batch (see the module docstring for what every one has)."""

    @abstractmethod
    def build_step(self, rt, mm, hp, w: dict, buf, cache: SequenceCache, max_tokens: int,
                   max_outputs: int) -> list[Launch]:
        """The launches of one forward step over up to max_tokens tokens (any mix of sequences, each in
        position order), ending in logits and argmax of up to max_outputs rows (buf.out_idx)."""

    # -- optional parts -------------------------------------------------------------------------------------

    has_mtp_head = False  # files of this architecture may ship an MTP (NextN) block

    def mtp_buffers(self, rt, hp, max_tokens: int):
        raise NotImplementedError(f"{self.name} has no MTP block")

    def mtp_draft_heads(self, hp) -> int:
        """MTP heads that draft in a chain, head k the (k+1)-th draft (step35: each of its nextn_predict_layers
        blocks, as llama.cpp's chain_heads); 1: one block drafts every position. With more than one,
        build_mtp_step takes head=k for k >= 1."""
        return 1

    def build_mtp_step(self, rt, mm, hp, w: dict, buf, mbuf, cache: SequenceCache, max_tokens: int,
                       max_outputs: int, hidden_src) -> list[Launch]:
        """The MTP block over (token, hidden row of hidden_src) pairs (models/blocks.py: mtp_step)."""
        raise NotImplementedError(f"{self.name} has no MTP block")

    def build_replay(self, rt, hp, w: dict, buf, cache: SequenceCache) -> list[Launch] | None:
        """Launches that bring recurrent layers to the state after a kept prefix of a verify step's rows
        (see runner.rollback), or None: the cache rolls back by its lengths alone."""
        return None


def mtp_architectures() -> list[str]:
    from nextn.models import ARCHITECTURES

    return sorted(name for name, a in ARCHITECTURES.items() if a.has_mtp_head)


# -- loading helpers shared by the architectures ---------------------------------------------------------------

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def is_experts(name: str) -> bool:
    """A routed experts' 3-D tensor (uploaded per expert, tile-padded)."""
    return any(f".{t}." in name for t in EXPERT_TENSORS)


def head_tensors(hp, mf: ModelFile) -> TensorTable:
    """The embedding, the final norm and (unless tied to the embedding) the output head, as every decoder has."""
    t = {"token_embd.weight": ((hp.n_embd, hp.n_vocab), SUPPORTED_TYPES), "output_norm.weight": ((hp.n_embd,), F32)}
    if mf.has("output.weight"):
        t["output.weight"] = ((hp.n_embd, hp.n_vocab), SUPPORTED_TYPES)
    return t


def fused_groups(infos: dict, candidates) -> dict[str, list[str]]:
    """Device weight name -> the file tensors concatenated (by rows) into it. A candidate group (Q|K|V,
    gate|up) is fused when its members' types agree (one mat-vec instead of three or two); otherwise each
    member stays itself and the step writes them side by side into the same activation row."""
    groups: dict[str, list[str]] = {}
    fused = set()
    for name, members in candidates:
        if all(m in infos for m in members) and len({infos[m].qtype for m in members}) == 1:
            groups[name] = members
            fused.update(members)
    for name in infos:
        if name not in fused:
            groups[name] = [name]
    return groups


def upload_group(rt, mf: ModelFile, infos: dict, members: list[str], name: str):
    """One device weight: a 1-D tensor as float32, a matrix (or row-concatenated matrices) as DeviceWeight."""
    first = infos[members[0]]
    if len(first.ne) == 1:  # norms, biases (several: concatenated)
        return rt.upload(np.concatenate([np.asarray(mf.array_f32(infos[m]), np.float32) for m in members]), name)
    raw = mf.raw(first) if len(members) == 1 else np.concatenate([mf.raw(infos[m]) for m in members])
    n_rows = sum(infos[m].n_rows for m in members)
    return upload_weight(rt, raw, first.qtype, n_rows, first.n_cols, name)
