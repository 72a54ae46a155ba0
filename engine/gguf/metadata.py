"""GGUF metadata as a plain dict of Python values (strings decoded, arrays as lists)."""

from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType

from nextn.gguf.header import read_header


def _field_value(field: gguf.ReaderField) -> Any:
    # gguf's ReaderField.contents() is correct but slow on a 150k-entry vocabulary; strings and numeric
    # arrays are read straight from the memory-mapped parts here instead.
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[1] == GGUFValueType.STRING:
        parts = field.parts
        return [parts[i].tobytes().decode("utf-8", errors="replace") for i in field.data]
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[1] != GGUFValueType.ARRAY:
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()


def metadata_dict(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields of an open GGUFReader except the header counters."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_metadata(path) -> dict[str, Any]:
    """All key/value fields of a GGUF file, e.g. {'general.architecture': 'qwen3', ...} (fast header reader)."""
    return read_header(path).meta
