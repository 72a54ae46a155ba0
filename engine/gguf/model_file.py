"""A GGUF file opened for loading: metadata, the tensor table, and memory-mapped tensor bytes.

Everything that can be wrong with a file (bad magic, truncation, a tensor that is missing, mis-shaped
or of an unsupported type) is reported as one ModelLoadError that names the file and the problem, before
anything is uploaded to the device.
"""

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from nextn.errors import ModelLoadError
from nextn.gguf.header import HeaderError, read_header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous dimension (a 2-D weight is [n_cols, n_rows])
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:])) if len(self.ne) > 1 else 1

    @property
    def n_cols(self) -> int:
        return self.ne[0]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _array_of(ok):
    return lambda v: isinstance(v, list) and all(ok(x) for x in v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_flag(v) -> bool:
    return isinstance(v, (bool, int))


# What the keys read without a typed accessor (int_key / float_key) must hold ("{arch}." stands for the
# architecture's prefix); a value of another type (GGUF arrays hold one type) is refused naming the key, before
# a model or the tokenizer reads it.
VALUE_TYPES = {
    "general.architecture": ("a string", _is_str),
    "{arch}.vocab_size": ("an integer", _is_int),
    "{arch}.rope.scaling.type": ("a string", _is_str),
    "{arch}.rope.dimension_sections": ("an array of integers", _array_of(_is_int)),
    "{arch}.attention.recurrent_layers": ("an array of booleans", _array_of(_is_flag)),
    "{arch}.attention.sliding_window_pattern": ("an array of booleans", _array_of(_is_flag)),
    "{arch}.attention.head_count_kv": ("an integer or an array of integers",
                                        lambda v: _is_number(v) or _array_of(_is_int)(v)),
    "{arch}.expert_weights_norm": ("true or false", _is_flag),
    "tokenizer.ggml.model": ("a string", _is_str),
    "tokenizer.ggml.pre": ("a string", _is_str),
    "tokenizer.chat_template": ("a string", _is_str),
    "tokenizer.ggml.tokens": ("an array of strings", _array_of(_is_str)),
    "tokenizer.ggml.merges": ("an array of strings", _array_of(_is_str)),
    "tokenizer.ggml.token_type": ("an array of integers", _array_of(_is_int)),
    "tokenizer.ggml.scores": ("an array of numbers", _array_of(_is_number)),
}
_TOKEN_ID = re.compile(r"tokenizer\.ggml\.\w+_token_id")
_TOKENIZER_FLAG = re.compile(r"tokenizer\.ggml\.add_\w+")


def check_value_types(meta: dict[str, Any], arch: str, path) -> None:
    """Refuses a key of VALUE_TYPES, a tokenizer.ggml.*_token_id or a tokenizer.ggml.add_* flag whose value has
    another type (a float where the token list belongs once raised a TypeError from inside a model)."""
    for key, v in meta.items():
        rule = VALUE_TYPES.get(key.replace(f"{arch}.", "{arch}.", 1) if key.startswith(f"{arch}.") else key)
        if rule is None and _TOKEN_ID.fullmatch(key):
            rule = ("an integer", _is_int)
        elif rule is None and _TOKENIZER_FLAG.fullmatch(key):
            rule = ("true or false", _is_flag)
        if rule is not None and not rule[1](v):
            shown = repr(v) if not isinstance(v, (list, str)) or len(v) < 8 else f"{type(v).__name__} of {len(v)}"
            raise ModelLoadError(f"{path}: metadata key {key} must be {rule[0]}, not {shown}")


class Metadata:
    """Typed reads of GGUF metadata (`meta`, with `arch` and `path` for the messages): a missing key or a value
    of the wrong type or range is a ModelLoadError naming the key. ModelFile reads a file's; make-tiny the
    metadata it is writing."""

    meta: dict[str, Any]
    arch: str
    path: Path

    def key(self, name: str, default: Any = ...) -> Any:
        """Metadata value; `{arch}` in the name is replaced by the architecture. Missing and no default: error."""
        full = name.replace("{arch}", self.arch)
        if full in self.meta:
            return self.meta[full]
        if default is ...:
            raise ModelLoadError(f"{self.path}: metadata key {full} is missing")
        return default

    def int_key(self, name: str, default: Any = ..., *, lo: int | None = None) -> int:
        """An integer metadata value (a float with an integral value passes), at least `lo` when given; a value
        of another type or out of range is refused naming the key."""
        v = self.key(name, default)
        full = name.replace("{arch}", self.arch)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or float(v) != int(v):
            raise ModelLoadError(f"{self.path}: metadata key {full} = {v!r} is not an integer")
        if lo is not None and int(v) < lo:
            raise ModelLoadError(f"{self.path}: metadata key {full} = {int(v)} must be at least {lo}")
        return int(v)

    def float_key(self, name: str, default: Any = ..., *, positive: bool = False) -> float:
        """A finite number from the metadata (positive when asked); anything else is refused naming the key."""
        v = self.key(name, default)
        full = name.replace("{arch}", self.arch)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ModelLoadError(f"{self.path}: metadata key {full} = {v!r} is not a finite number")
        if positive and not v > 0:
            raise ModelLoadError(f"{self.path}: metadata key {full} = {v!r} must be positive")
        return float(v)


class ModelFile(Metadata):
    """An open GGUF file. `raw(name)` gives a tensor's bytes as uint8 [n_rows, row_bytes] (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelLoadError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise ModelLoadError(f"{self.path}: is a directory, not a GGUF file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            header = read_header(self.path)
        except (HeaderError, UnicodeDecodeError, OverflowError) as e:
            raise ModelLoadError(f"{self.path}: corrupt or truncated GGUF header ({e})") from None
        self.meta: dict[str, Any] = header.meta
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors: dict[str, TensorInfo] = {}
        align = int(self.meta.get("general.alignment", 32))
        for t in header.tensors:
            if any(n < 1 for n in t.ne):
                raise ModelLoadError(f"{self.path}: tensor {t.name} has a dimension of size 0 ({list(t.ne)})")
            if t.offset % align:
                raise ModelLoadError(f"{self.path}: tensor {t.name} starts at byte {t.offset}, not aligned to "
                                     f"general.alignment = {align}")
            try:
                qtype = gguf.GGMLQuantizationType(t.type_id)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor {t.name} has unknown type id {t.type_id}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(t.ne)) if t.ne else 1
            if t.ne and t.ne[0] % block:
                raise ModelLoadError(
                    f"{self.path}: tensor {t.name} has rows of {t.ne[0]} elements, not a multiple of "
                    f"{qtype.name}'s block of {block}"
                )
            info = TensorInfo(t.name, qtype, t.ne, t.offset, n_elements // block * type_size)
            if info.offset + info.nbytes > size:
                raise ModelLoadError(
                    f"{self.path}: file is truncated: tensor {t.name} ends at byte {info.offset + info.nbytes} "
                    f"but the file has {size} bytes"
                )
            self.tensors[t.name] = info
        # every tensor's bytes are its own: a tensor whose type and shape claim more bytes than lie before the
        # next tensor's data would read (and a repacked upload would mix) another tensor's bytes
        spans = sorted(self.tensors.values(), key=lambda i: i.offset)
        for a, b in zip(spans, spans[1:]):
            if a.offset + a.nbytes > b.offset:
                raise ModelLoadError(f"{self.path}: tensors {a.name} and {b.name} overlap: {a.name} "
                                     f"({a.qtype.name} {list(a.ne)}, {a.nbytes} bytes from byte {a.offset}) runs "
                                     f"past byte {b.offset}")
        self.arch: str = self.meta.get("general.architecture", "")
        if not self.arch:
            raise ModelLoadError(f"{self.path}: metadata has no general.architecture")
        check_value_types(self.meta, self.arch, self.path)
        # every block has tensors of its own: a block count past the tensor count is a broken file, and a model
        # would otherwise build a table of 2**31 layers before it noticed the missing tensors
        n_block = self.meta.get(f"{self.arch}.block_count")
        if isinstance(n_block, (int, float)) and not isinstance(n_block, bool) and n_block > len(self.tensors):
            raise ModelLoadError(f"{self.path}: metadata key {self.arch}.block_count = {n_block} is more than the "
                                 f"file's {len(self.tensors)} tensors")
        self._check_rope_dims()

    def _check_rope_dims(self) -> None:
        """RoPE turns pairs within one head, in every architecture (llama.cpp: n_rot <= n_embd_head_k): a larger
        rope.dimension_count is a broken file (2**31 of them made a model loop over its pairs for minutes)."""
        m, a = self.meta, self.arch
        n_rot = m.get(f"{a}.rope.dimension_count")
        head = m.get(f"{a}.attention.key_length")
        if head is None:
            n_embd, n_head = m.get(f"{a}.embedding_length"), m.get(f"{a}.attention.head_count")
            if _is_int(n_embd) and _is_int(n_head) and n_head > 0:
                head = n_embd // n_head
        if _is_number(n_rot) and _is_number(head) and n_rot > head:
            raise ModelLoadError(f"{self.path}: metadata key {a}.rope.dimension_count = {n_rot!r} is more than the "
                                 f"head size {head!r}")

    # -- tensors ----------------------------------------------------------------------------------------

    def tensor(self, name: str, ne: tuple[int, ...], types: frozenset | None = None) -> TensorInfo:
        """The tensor `name`, checked to have shape `ne` (GGUF order) and a type in `types`."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.path}: tensor {name} is missing (architecture {self.arch})")
        if tuple(info.ne) != tuple(ne):
            raise ModelLoadError(f"{self.path}: tensor {name} has shape {list(info.ne)}, expected {list(ne)}")
        if types is not None and info.qtype not in types:
            allowed = ", ".join(sorted(t.name for t in types))
            raise ModelLoadError(
                f"{self.path}: tensor {name} has type {info.qtype.name}, which nextn does not support here "
                f"(supported: {allowed})"
            )
        return info

    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [n_rows, row_bytes], memory-mapped (no copy)."""
        data = self._data[info.offset : info.offset + info.nbytes]
        return data.reshape(info.n_rows, info.nbytes // info.n_rows)

    def array_f32(self, info: TensorInfo) -> np.ndarray:
        """A float32 tensor (norm weights) as a flat float32 array."""
        return self.raw(info).view(np.float32).reshape(-1)
