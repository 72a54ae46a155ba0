"""GGUF metadata as a plain dict of Python values (strings decoded, arrays as lists)."""

from typing import Any

import gguf
from gguf import GGUFValueType


def _field_value(field: gguf.ReaderField) -> Any:
    # gguf's ReaderField.contents() is correct but takes seconds on a 150k-entry vocabulary; strings and
    # numeric arrays are read straight from the memory-mapped parts here instead.
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[1] == GGUFValueType.STRING:
        parts = field.parts
        return [parts[i].tobytes().decode("utf-8", errors="replace") for i in field.data]
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[1] != GGUFValueType.ARRAY:
        parts = field.parts
        if not field.data:
            return []
        import numpy as np

        return np.concatenate([parts[i] for i in field.data]).tolist()
    return field.contents()


def metadata_dict(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields except the GGUF header counters, e.g. {'general.architecture': 'qwen3', ...}."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_metadata(path: str) -> dict[str, Any]:
    return metadata_dict(gguf.GGUFReader(path, "r"))
