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
    q5_0 = gguf.GGMLQuantizationType.Q5_0  # a valid GGUF type nextn has no kernels for
    block, size = gguf.GGML_QUANT_SIZES[q5_0]
    raw = np.zeros((n_rows, n_cols // block * size), np.uint8)
    p = rewrite(good, tmp_path / "q5_0.gguf", replace={t.name: (raw, q5_0)})
    refused(p, "blk.0.ffn_gate.weight has type Q5_0", "supported:")


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
