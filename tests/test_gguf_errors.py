"""Bad GGUF files are refused with one clear message naming the file and the problem, nothing half-loaded."""

import subprocess
import sys

import gguf
import numpy as np
import pytest

from gguf_edit import rewrite
from nextn.errors import ModelLoadError, UnsupportedArchitecture
from nextn.model_info import model_summary
from nextn.devtools.tiny import make_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gguf") / "good.gguf", arch="qwen3", qtype="Q8_0", seed=1)


def refused(path, *fragments, exc=ModelLoadError):
    with pytest.raises(exc) as e:
        model_summary(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_good_file_loads(good):
    s = model_summary(good)
    assert s["architecture"] == "qwen3"


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.gguf", "no such file")


def test_bad_magic(tmp_path, good):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + good.read_bytes()[4:])
    refused(p, "not a GGUF file")


def test_truncated_data(tmp_path, good):
    p = tmp_path / "cut.gguf"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    refused(p, "truncated")


def test_truncated_header(tmp_path, good):
    p = tmp_path / "cut-header.gguf"
    p.write_bytes(good.read_bytes()[:200])
    refused(p, "truncated")


def test_unknown_architecture(tmp_path, good):
    p = rewrite(good, tmp_path / "arch.gguf", arch="mamba9")
    msg = refused(p, "architecture 'mamba9' is not supported", exc=UnsupportedArchitecture)
    assert "qwen3" in msg  # says what is supported


def test_missing_tensor(tmp_path, good):
    p = rewrite(good, tmp_path / "missing.gguf", drop={"blk.1.ffn_up.weight"})
    refused(p, "tensor blk.1.ffn_up.weight is missing")


def test_misshaped_tensor(tmp_path, good):
    r = gguf.GGUFReader(good)
    t = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    n = int(t.shape[0])
    p = rewrite(good, tmp_path / "shape.gguf", replace={t.name: (np.ones(n + 1, np.float32), gguf.GGMLQuantizationType.F32)})
    refused(p, "tensor blk.0.attn_norm.weight has shape", f"expected [{n}]")


def test_unsupported_quant_type(tmp_path, good):
    r = gguf.GGUFReader(good)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_gate.weight")
    n_cols, n_rows = (int(x) for x in t.shape)
    mxfp4 = gguf.GGMLQuantizationType.MXFP4  # a valid GGUF type nextn has no kernels for
    block, size = gguf.GGML_QUANT_SIZES[mxfp4]
    raw = np.zeros((n_rows, n_cols // block * size), np.uint8)
    p = rewrite(good, tmp_path / "mxfp4.gguf", replace={t.name: (raw, mxfp4)})
    refused(p, "blk.0.ffn_gate.weight has type MXFP4", "supported:")


def test_cli_prints_one_line_no_traceback(tmp_path, good):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUX" + good.read_bytes()[4:])
    r = subprocess.run([sys.executable, "-m", "nextn", "inspect", str(p)], capture_output=True, text=True)
    assert r.returncode == ModelLoadError.exit_code
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("nextn: error: ") and "not a GGUF file" in r.stderr


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    refused(p, "not a GGUF file")


def test_fast_header_reader_agrees_with_gguf_py(good):
    from nextn.gguf.header import read_header
    from nextn.gguf.metadata import metadata_dict

    r = gguf.GGUFReader(good)
    h = read_header(good)
    assert h.meta == metadata_dict(r)
    assert {t.name: (t.ne, t.type_id, t.offset) for t in h.tensors} == {
        t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in r.tensors
    }


V = gguf.GGUFValueType


@pytest.mark.parametrize("key,value,vtype,fragment", [
    ("qwen3.block_count", "two", V.STRING, "qwen3.block_count = 'two' is not an integer"),
    ("qwen3.embedding_length", 0, V.UINT32, "qwen3.embedding_length = 0 must be at least 1"),
    ("qwen3.attention.head_count_kv", 3, V.UINT32, "not a multiple of head_count_kv 3"),
    ("qwen3.rope.dimension_count", 7, V.UINT32, "rope.dimension_count = 7 must be even"),
    ("qwen3.attention.layer_norm_rms_epsilon", float("nan"), V.FLOAT32, "layer_norm_rms_epsilon = nan is not a finite"),
    ("qwen3.rope.freq_base", -1.0, V.FLOAT32, "rope.freq_base = -1.0 must be positive"),
    ("qwen3.rope.freq_base", float("inf"), V.FLOAT32, "rope.freq_base = inf is not a finite"),
])
def test_bad_metadata_values_are_refused_naming_the_key(tmp_path, good, key, value, vtype, fragment):
    p = rewrite(good, tmp_path / "meta.gguf", set_keys={key: (value, vtype)})
    refused(p, fragment)


def _patch_tensor_info(src, dst, name, part, value):
    """Copy src to dst and overwrite one field of tensor `name`'s info record in place: part -1 is its data
    offset (relative to the data section), part 2 + i its dimension i."""
    dst.write_bytes(src.read_bytes())
    r = gguf.GGUFReader(dst, "r+")
    t = next(t for t in r.tensors if t.name == name)
    t.field.parts[part][0] = value
    del r
    return dst


def test_bad_tensor_records_are_refused_naming_the_tensor(tmp_path, good):
    r = gguf.GGUFReader(good)
    names = [t.name for t in r.tensors]
    first, second = (next(t for t in r.tensors if t.name == n) for n in names[:2])
    rel = int(second.field.parts[-1][0])
    p = _patch_tensor_info(good, tmp_path / "misaligned.gguf", second.name, -1, rel + 4)
    refused(p, f"tensor {second.name} starts at byte", "not aligned to general.alignment = 32")
    p = _patch_tensor_info(good, tmp_path / "overlap.gguf", second.name, -1, int(first.field.parts[-1][0]))
    refused(p, "overlap")
    p = _patch_tensor_info(good, tmp_path / "zero.gguf", first.name, 3, 0)
    refused(p, f"tensor {first.name} has a dimension of size 0")


def test_bad_alignment_is_refused(tmp_path, good):
    p = rewrite(good, tmp_path / "align.gguf", set_keys={"general.alignment": (0, V.UINT32)})
    refused(p, "general.alignment = 0 is not a power of two")
