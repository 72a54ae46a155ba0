"""Rewrite a GGUF file with edits, to make broken or unusual files for loader tests."""

import gguf
import numpy as np

from nextn.gguf.metadata import metadata_dict


def rewrite(src, dst, *, arch=None, drop=(), replace=None, set_keys=None, drop_keys=()):
    """Copy `src` to `dst`, changing the architecture, dropping tensors/keys, replacing tensors
    (name -> (array, qtype); quantized arrays as uint8 rows) and setting metadata keys (key -> (value, GGUFValueType))."""
    r = gguf.GGUFReader(src, "r")
    meta = metadata_dict(r)
    old_arch = meta["general.architecture"]
    new_arch = arch or old_arch
    w = gguf.GGUFWriter(dst, new_arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        value = meta[key]
        vtype = field.types[0]
        sub = field.types[1] if len(field.types) > 1 else None
        name = key.replace(f"{old_arch}.", f"{new_arch}.", 1) if key.startswith(f"{old_arch}.") else key
        w.add_key_value(name, value, vtype, sub_type=sub)
    for key, (value, vtype) in (set_keys or {}).items():
        w.add_key_value(key, value, vtype)
    replace = replace or {}
    for t in r.tensors:
        if t.name in drop:
            continue
        if t.name in replace:
            arr, qtype = replace[t.name]
            w.add_tensor(t.name, arr, raw_dtype=qtype)  # uint8 rows for quantized types: shape from the bytes
            continue
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        data = np.array(t.data)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data.view(np.uint8).reshape(*data.shape[:-1], -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
