"""nextn.gguf.quantize: bytes that gguf-py's independent dequantizer reads back close to the input.

gguf.quants.dequantize is the truth for the block layouts (it is what the reference forward and the kernel
tests use); a packing mistake shows up as an O(1) error, far above the per-type bounds below.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from nextn.gguf.quantize import SUPPORTED, dequantize, parse_qtype, quantize, row_bytes

# relative RMS error bound per type on N(0, 1) weights (measured values in nextn/gguf/quantize.py)
RMS_BOUND = {
    QT.F32: 0.0,
    QT.F16: 5e-4,
    QT.BF16: 3e-3,
    QT.Q8_0: 8e-3,
    QT.Q6_K: 2.5e-2,
    QT.Q5_1: 4.5e-2,
    QT.Q5_K: 4.5e-2,
    QT.Q5_0: 5e-2,
    QT.Q4_K: 8.5e-2,
    QT.IQ4_NL: 8.5e-2,
    QT.IQ4_XS: 8.5e-2,
    QT.Q4_1: 9e-2,
    QT.Q4_0: 0.1,
    QT.Q3_K: 0.16,
    QT.Q2_K: 0.31,
}
# the 256-column types: sub-block scales packed into bits of the block
K_QUANTS = (QT.IQ4_XS, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def roundtrip(w, qtype):
    q = quantize(w, qtype)
    assert q.dtype == np.uint8
    assert q.shape == (w.shape[0], row_bytes(w.shape[1], qtype))
    return gguf.quants.dequantize(q, qtype).reshape(w.shape)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_roundtrip_error_bound(qtype):
    w = np.random.default_rng(0).standard_normal((48, 1024)).astype(np.float32)
    err = rel_rms(roundtrip(w, qtype), w)
    assert err <= RMS_BOUND[qtype], f"{qtype.name}: relative RMS error {err:.4g} > {RMS_BOUND[qtype]}"


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_error_is_relative_to_each_block(qtype):
    # rows 1e-2 .. 1e3 apart: each block carries its own scale, so the bound holds row by row. (Below ~1e-3
    # the half-precision block scales go subnormal and lose digits: Q6_K's d = max/4096 first; the same
    # holds for llama.cpp's files.)
    rng = np.random.default_rng(1)
    scales = np.logspace(-2, 3, 6).astype(np.float32)[:, None]
    w = (rng.standard_normal((6, 512)) * scales).astype(np.float32)
    d = roundtrip(w, qtype)
    for r in range(6):
        assert rel_rms(d[r], w[r]) <= max(RMS_BOUND[qtype] * 1.5, 1e-7), (qtype.name, r)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_special_blocks(qtype):
    n = 256
    w = np.zeros((5, n), dtype=np.float32)
    w[1] = 0.75  # constant
    w[2] = np.abs(np.random.default_rng(2).standard_normal(n)) + 0.5  # all positive: min > 0
    w[3] = -w[2]  # all negative
    w[4, 7] = 3.0  # one spike in zeros
    d = roundtrip(w, qtype)
    assert np.all(d[0] == 0) and not np.any(np.signbit(d[0]) & (d[0] != 0))
    assert np.abs(d[1] - 0.75).max() <= 0.75 * max(RMS_BOUND[qtype], 1e-3)
    for r in (2, 3):
        assert rel_rms(d[r], w[r]) <= RMS_BOUND[qtype], (qtype.name, r)
    assert abs(d[4, 7] - 3.0) <= 3.0 * max(RMS_BOUND[qtype], 1e-3)
    assert np.abs(np.delete(d[4], 7)).max() <= 3.0 * max(RMS_BOUND[qtype], 1e-3)


@pytest.mark.parametrize("qtype", (QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1), ids=lambda t: t.name)
def test_gguf_py_types_are_gguf_py_bytes(qtype):
    w = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    assert np.array_equal(quantize(w, qtype), np.asarray(gguf.quants.quantize(w, qtype)).view(np.uint8))


def test_float_types_exact():
    w = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(quantize(w, "F32").view(np.float32), w)
    assert np.array_equal(quantize(w, "f16").view(np.float16), w.astype(np.float16))
    assert np.array_equal(dequantize(quantize(w, QT.F32), QT.F32, 64), w)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quant_block_layout(qtype):
    # every element of a block gets a distinct value on a smooth ramp; a nibble, high-bit or sub-block
    # scale written to the wrong place moves an element by a large fraction of the ramp, not a level
    ramp = np.linspace(-1.0, 2.0, 256, dtype=np.float32)
    w = np.stack([ramp, ramp[::-1], np.roll(ramp, 77)])
    d = roundtrip(w, qtype)
    # IQ4_XS: the widest step between its levels (24 of 127) at the largest |x|, 2
    level = {QT.IQ4_XS: 2.0 * 24 / 127, QT.Q2_K: 3.0 / 3, QT.Q3_K: 3.0 / 7, QT.Q4_K: 3.0 / 15, QT.Q5_K: 3.0 / 31,
             QT.Q6_K: 3.0 / 63}[qtype]
    assert np.abs(d - w).max() <= level, f"{qtype.name}: max error {np.abs(d - w).max():.3g}"


def test_chunked_rows_match_unchunked(monkeypatch):
    import nextn.gguf.quantize as qmod

    w = np.random.default_rng(5).standard_normal((10, 512)).astype(np.float32)
    whole = quantize(w, QT.Q4_K)
    monkeypatch.setattr(qmod, "_CHUNK_ELEMS", 1024)  # two rows per pass
    assert np.array_equal(quantize(w, QT.Q4_K), whole)


def test_one_d_input_and_dequantize_helper():
    v = np.random.default_rng(6).standard_normal(256).astype(np.float32)
    q = quantize(v, QT.Q6_K)
    assert q.shape == (1, 210)
    assert rel_rms(dequantize(q, "Q6_K", 256)[0], v) <= RMS_BOUND[QT.Q6_K]


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the Q4_K block size 256"):
        quantize(np.zeros((2, 64), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="unknown tensor type"):
        parse_qtype("Q3_Z")
    with pytest.raises(ValueError, match="not supported"):
        parse_qtype(QT.IQ2_XXS)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        quantize(np.zeros((2, 2, 32), np.float32), QT.Q8_0)
