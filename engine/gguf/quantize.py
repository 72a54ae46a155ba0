"""Quantize float32 weights into GGUF tensor bytes, for the tiny test models and for kernel tests.

`quantize(w, qtype)` turns a float32 matrix [n_rows, n_cols] into the bytes a GGUF file stores for it,
uint8 [n_rows, row_bytes], block after block as llama.cpp lays them out (ggml/src/ggml-common.h).

F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 go through gguf-py's own quantizers (gguf.quants), which
match ggml-quants.c bit for bit. gguf-py 0.19 can only *de*quantize the K-quants and the IQ4 types, so they
are written here, numpy-vectorised over blocks. Q4_K, Q5_K and Q6_K follow quantize_row_q{4,5,6}_K_ref: the
same per-sub-block scale search (make_qkx2_quants for Q4_K/Q5_K, make_qx_quants for Q6_K), the same
6-/8-bit quantization of the sub-block scales and the same bit packing. Checked against libggml's
quantize_row_q*_K_ref on Gaussian rows of mixed scale: 97-99% of blocks come out byte-identical, the rest
differ where float32 sums taken in another order tip a near tie in the scale search (same RMS error).
Q2_K and Q3_K follow quantize_row_q{2,3}_K_ref (make_qkx2_quants with |x| weights and absolute error for
Q2_K's sub-blocks of 16, make_q3_quants for Q3_K's), IQ4_NL and IQ4_XS quantize_iq4_nl / quantize_iq4_xs
without an importance matrix (the scale search of quantize_row_iq4_nl_impl on the 16 non-linear levels,
ntry 7): 99-100% of blocks byte-identical with libggml's on the same rows.

Relative RMS error (RMS(dequant - w) / RMS(w)) on Gaussian weights, as tests/test_quantize.py checks:
F32 0, F16 < 5e-4, BF16 < 3e-3, Q8_0 < 8e-3, Q6_K < 2.5e-2, Q5_1 < 4.5e-2, Q5_K < 4.5e-2, Q5_0 < 5e-2,
Q4_K < 8.5e-2, IQ4_NL < 8.5e-2, IQ4_XS < 8.5e-2, Q4_1 < 9e-2, Q4_0 < 0.1, Q3_K < 0.16, Q2_K < 0.31
(measured: 2e-4, 1.6e-3, 5.3e-3, 1.8e-2, 3.8e-2, 3.6e-2, 4.3e-2, 7.1e-2, 7.6e-2, 7.7e-2, 7.8e-2, 8.6e-2,
0.152, 0.296).
"""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

QK_K = 256

# the types nextn's kernels read; everything the tiny-model maker can write
SUPPORTED = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL, QT.IQ4_XS, QT.Q2_K,
    QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
)

# the types gguf-py quantizes itself (bit for bit as ggml-quants.c)
_GGUF_PY = (QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)

# elements quantized per numpy pass in the K-quant search: bounds the temporaries to a few tens of MB
_CHUNK_ELEMS = 1 << 20


def parse_qtype(name: "str | QT") -> QT:
    """'q8_0' / 'Q8_0' / GGMLQuantizationType.Q8_0 -> GGMLQuantizationType.Q8_0 (one of SUPPORTED)."""
    if isinstance(name, QT):
        qtype = name
    else:
        try:
            qtype = QT[str(name).upper()]
        except KeyError:
            raise ValueError(
                f"unknown tensor type {name!r}; supported: {', '.join(t.name for t in SUPPORTED)}"
            ) from None
    if qtype not in SUPPORTED:
        have = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"tensor type {qtype.name} is not supported; supported: {have}")
    return qtype


def block_size(qtype: QT) -> int:
    """Elements per block; a row length must be a multiple of it."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_bytes(n_cols: int, qtype: QT) -> int:
    """Bytes one row of n_cols elements takes in qtype."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if n_cols % bs:
        raise ValueError(f"row length {n_cols} is not a multiple of the {qtype.name} block size {bs}")
    return n_cols // bs * ts


def quantize(weights: np.ndarray, qtype: "QT | str") -> np.ndarray:
    """float32 [n_rows, n_cols] (or 1-D [n_cols]) -> uint8 [n_rows, row_bytes] in GGUF block layout."""
    qtype = parse_qtype(qtype)
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 1-D or 2-D array, got shape {w.shape}")
    n_rows, n_cols = w.shape
    rb = row_bytes(n_cols, qtype)
    w = np.ascontiguousarray(w)
    if qtype == QT.F32:
        return w.view(np.uint8).reshape(n_rows, rb)
    if qtype == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(n_rows, rb)
    if qtype in _GGUF_PY:
        return np.asarray(gguf.quants.quantize(w, qtype), dtype=np.uint8).reshape(n_rows, rb)
    blocks_fn = {
        QT.IQ4_NL: _iq4_nl_blocks,
        QT.IQ4_XS: _iq4_xs_blocks,
        QT.Q2_K: _q2_k_blocks,
        QT.Q3_K: _q3_k_blocks,
        QT.Q4_K: _q4_k_blocks,
        QT.Q5_K: _q5_k_blocks,
        QT.Q6_K: _q6_k_blocks,
    }[qtype]
    out = np.empty((n_rows, rb), dtype=np.uint8)
    rows_per_chunk = max(1, _CHUNK_ELEMS // n_cols)
    for r0 in range(0, n_rows, rows_per_chunk):
        chunk = w[r0 : r0 + rows_per_chunk].reshape(-1, block_size(qtype))
        out[r0 : r0 + rows_per_chunk] = blocks_fn(chunk).reshape(-1, rb)
    return out


def dequantize(data: np.ndarray, qtype: "QT | str", n_cols: int) -> np.ndarray:
    """uint8 [n_rows, row_bytes] -> float32 [n_rows, n_cols] (gguf-py's dequantizer; for tests and tools)."""
    qtype = parse_qtype(qtype)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(n_cols, qtype))
    if qtype == QT.F32:
        return data.view(np.float32).reshape(-1, n_cols)
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(-1, n_cols)


# ---------------------------------------------------------------------------------------------- helpers


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [n] -> uint8 [n, 2] (IEEE half, little-endian)."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_round(x: np.ndarray) -> np.ndarray:
    """The value a float32 has after a trip through half precision (the block's stored scale)."""
    return x.astype(np.float16).astype(np.float32)


def _make_qkx2_quants(
    x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, w: np.ndarray | None = None,
    use_mad: bool = False,
):
    """Asymmetric (scale, min) search for sub-blocks x [n, k]; ggml-quants.c make_qkx2_quants.

    Tries nstep+1 candidate inverse scales around nmax/(max-min), fits scale and min by weighted least
    squares for each rounding, and keeps the one of least weighted squared (use_mad: absolute) error.
    Weights w [n, k] default to Q4_K's / Q5_K's, av_x + |x|. Returns (scale [n], -min [n] >= 0).
    """
    if w is None:
        w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)

    def error(diff):
        return (w * (np.abs(diff) if use_mad else diff**2)).sum(axis=1)

    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = x.max(axis=1)
    rng = xmax - xmin
    flat = rng == 0
    safe_rng = np.where(flat, 1.0, rng)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)

    iscale = nmax / safe_rng
    scale = 1.0 / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    best_err = error(scale[:, None] * L + xmin[:, None] - x)
    best_scale, best_min = scale, xmin.copy()
    for step in range(nstep + 1):
        # as in llama.cpp, the candidate grid follows the best min found so far (max - min grows as it
        # goes negative), so the search is sequential in `step` though vectorised over sub-blocks
        span = np.where(flat, 1.0, xmax - best_min)
        iscale = (rmin + rdelta * step + nmax) / span
        La = np.clip(np.rint(iscale[:, None] * (x - best_min[:, None])), 0, nmax)
        sum_l = (w * La).sum(axis=1)
        sum_l2 = (w * La * La).sum(axis=1)
        sum_xl = (w * La * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_D = np.where(ok, D, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D
        pos = this_min > 0  # the min must not be positive: refit the scale alone through 0
        this_min = np.where(pos, 0.0, this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        err = error(this_scale[:, None] * La + this_min[:, None] - x)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, this_scale, best_scale)
        best_min = np.where(better, this_min, best_min)
    best_scale = np.where(flat, 0.0, best_scale)
    best_min = np.where(flat, xmin, best_min)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _kquant_asym(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K part: x [n_blocks, 256] -> (d, dmin, packed 12 scale bytes, L [n_blocks, 8, 32])."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    scales, mins = _make_qkx2_quants(sub, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    # "+ 0.0" turns a -0.0 (the min of an all-zero block) into +0.0, as llama.cpp's running max from 0 does
    max_scale = scales.max(axis=1) + np.float32(0.0)
    max_min = mins.max(axis=1) + np.float32(0.0)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float32)
    dmin = (max_min / 63.0).astype(np.float32)

    # 6-bit scales and mins of 8 sub-blocks in 12 bytes (get_scale_min_k4 reads them back)
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)

    # final levels against the scales as stored (half-precision d, dmin times the 6-bit integers)
    dl = _f16_round(d)[:, None] * ls.astype(np.float32)  # [nb, 8]
    ml = _f16_round(dmin)[:, None] * lm.astype(np.float32)
    xs = x.reshape(nb, 8, 32)
    safe_dl = np.where(dl != 0, dl, 1.0)
    L = np.clip(np.rint((xs + ml[..., None]) / safe_dl[..., None]), 0, nmax)
    L = np.where((dl != 0)[..., None], L, 0).astype(np.uint8)
    return d, dmin, packed, L


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """block_q4_K: d (f16), dmin (f16), scales[12], qs[128]; value = d*sc*q - dmin*m, q in 0..15."""
    nb = x.shape[0]
    d, dmin, packed, L = _kquant_asym(x, 15, -1.0, 0.1, 20)
    L4 = L.reshape(nb, 4, 2, 32)  # 64-element chunks: low nibble = first 32, high nibble = next 32
    qs = (L4[:, :, 0, :] | (L4[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """block_q5_K: d, dmin, scales[12], qh[32], qs[128]; bit k of qh[j] is the 5th bit of sub-block k,
    item j."""
    nb = x.shape[0]
    d, dmin, packed, L = _kquant_asym(x, 31, -0.5, 0.1, 15)
    low = (L & 0xF).reshape(nb, 4, 2, 32)
    qs = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(nb, 128)
    high = (L >> 4).astype(np.uint8)  # [nb, 8, 32]
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):
        qh |= high[:, k, :] << k
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qh, qs], axis=1)


def _make_qx_quants_q6(x: np.ndarray, nmax: int = 32) -> np.ndarray:
    """Symmetric scale search for sub-blocks x [n, 16]; make_qx_quants(rmse_type=1): weights x^2,
    candidate inverse scales -(nmax + 0.1*is)/max for is in -9..9. Returns the signed scale [n]."""
    idx = np.abs(x).argmax(axis=1)
    vmax = x[np.arange(x.shape[0]), idx]
    zero = np.abs(vmax) < 1e-15
    safe_max = np.where(zero, 1.0, vmax)
    w = x * x

    def fit(iscale):
        L = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * L).sum(axis=1), (w * L * L).sum(axis=1)

    sumlx, suml2 = fit(-nmax / safe_max)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 > 0, suml2, 1.0)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    return np.where(zero, 0.0, scale).astype(np.float32)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """block_q6_K: ql[128], qh[64], scales[16] (int8), d (f16); value = d*sc*(q-32), q in 0..63."""
    nb = x.shape[0]
    scales = _make_qx_quants_q6(x.reshape(nb * 16, 16)).reshape(nb, 16)
    iamax = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), iamax]
    empty = np.abs(max_scale) < 1e-15
    iscale = np.where(empty, 0.0, -128.0 / np.where(empty, 1.0, max_scale))
    d = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, iscale)).astype(np.float32)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)

    dl = _f16_round(d)[:, None] * sc.astype(np.float32)  # [nb, 16]
    xs = x.reshape(nb, 16, 16)
    safe_dl = np.where(dl != 0, dl, 1.0)
    L = np.clip(np.rint(xs / safe_dl[..., None]), -32, 31) + 32
    # a zero scale makes every level decode to 0; write level 0 there, as llama.cpp's memset of an empty
    # block does
    L = np.where((dl != 0)[..., None], L, 0).astype(np.uint8).reshape(nb, 2, 4, 32)  # 128-chunks, quarters

    lo = L & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1
    )


# ggml's kvalues_iq4nl: the levels a 4-bit IQ4_NL / IQ4_XS index selects (times the block's scale)
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
_IQ4_MIDPOINTS = (_IQ4_LEVELS[1:] + _IQ4_LEVELS[:-1]) / 2


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """The index of the level nearest each value (a tie goes up), ggml's best_index_int8."""
    return np.searchsorted(_IQ4_MIDPOINTS, v, side="right").astype(np.uint8)


def _iq4_scales(x: np.ndarray, ntry: int = 7) -> np.ndarray:
    """Scale search for sub-blocks x [n, 32] on the IQ4 levels; ggml-quants.c quantize_row_iq4_nl_impl
    (no importance weights: weights x^2, as llama-quantize without an imatrix). Tries the scale that puts
    the largest |x| on the end level -127 and 2 ntry + 1 neighbours, fits each rounding by weighted least
    squares and keeps the best. Returns the signed scale [n] (0 for an all-zero sub-block)."""
    w = x * x
    vmax = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]
    empty = np.abs(vmax) < 1e-15  # ggml's GROUP_MAX_EPS
    safe_max = np.where(empty, 1.0, vmax)

    def fit(iscale):
        q = _IQ4_LEVELS[_iq4_index(iscale[:, None] * x)]
        return (w * q * x).sum(axis=1), (w * q * q).sum(axis=1)

    sumqx, sumq2 = fit(_IQ4_LEVELS[0] / -safe_max)  # the inverse of d = -max / levels[0]
    scale = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, 1.0), 0.0)
    best = scale * sumqx
    for step in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit((step + _IQ4_LEVELS[0]) / safe_max)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_scale = sumqx / np.where(sumq2 > 0, sumq2, 1.0)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumqx, best)
    return np.where(empty, 0.0, scale).astype(np.float32)


def _iq4_nibbles(L: np.ndarray) -> np.ndarray:
    """Level indices [n, k * 32] -> bytes [n, k * 16]: byte 16 i + j holds index 32 i + j (low nibble) and
    32 i + 16 + j (high)."""
    L4 = L.reshape(L.shape[0], -1, 2, 16)
    return (L4[:, :, 0] | (L4[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _iq4_levels_for(x: np.ndarray, dl: np.ndarray) -> np.ndarray:
    """Level indices of x [..., n] for the scales dl [...] (float32, before their trip through half
    precision, as ggml does); a zero scale gives the level nearest 0, which decodes to 0."""
    inv = np.where(dl != 0, 1.0 / np.where(dl != 0, dl, 1.0), 0.0)
    return _iq4_index(x * inv[..., None])


def _iq4_nl_blocks(x: np.ndarray) -> np.ndarray:
    """block_iq4_nl: d (f16), qs[16]; value = d * levels[q]."""
    d = _iq4_scales(x)
    L = _iq4_levels_for(x, d)
    return np.concatenate([_f16_bytes(d), _iq4_nibbles(L)], axis=1)


def _iq4_xs_blocks(x: np.ndarray) -> np.ndarray:
    """block_iq4_xs: d (f16), scales_h (u16), scales_l[4], qs[128]; value = d * (ls_j - 32) * levels[q]
    for sub-block j of 32, ls_j 6-bit: the low 4 bits nibble j % 2 of scales_l[j / 2], the high 2 bits
    2 j, 2 j + 1 of scales_h. Sub-block scales as IQ4_NL's, then quantized to 6 bits against the largest
    (ggml's quantize_row_iq4_nl_impl with super_block_size 256)."""
    nb = x.shape[0]
    scales = _iq4_scales(x.reshape(nb * 8, 32)).reshape(nb, 8)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    d = (-max_scale / 32).astype(np.float32)
    inv_d = np.where(d != 0, 1.0 / np.where(d != 0, d, 1.0), 0.0)
    ls = np.clip(np.rint(inv_d[:, None] * scales), -32, 31).astype(np.int32)
    L = _iq4_levels_for(x.reshape(nb, 8, 32), d[:, None] * ls)
    ls = (ls + 32).astype(np.uint16)
    scales_l = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
    scales_h = np.zeros(nb, np.uint16)
    for j in range(8):
        scales_h |= (ls[:, j] >> 4) << (2 * j)
    return np.concatenate(
        [_f16_bytes(d), scales_h.reshape(nb, 1).view(np.uint8), scales_l.astype(np.uint8),
         _iq4_nibbles(L.reshape(nb, 256))],
        axis=1,
    )


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """2-bit levels [nb, 256] -> qs [nb, 64] as Q2_K / Q3_K store them: byte 32 n + l holds levels
    128 n + 32 g + l at bits 2 g, 2 g + 1 (g = 0..3)."""
    L4 = L.reshape(L.shape[0], 2, 4, 32).astype(np.uint8)
    return (L4[:, :, 0] | (L4[:, :, 1] << 2) | (L4[:, :, 2] << 4) | (L4[:, :, 3] << 6)).reshape(-1, 64)


def _q2_k_blocks(x: np.ndarray) -> np.ndarray:
    """block_q2_K: scales[16] (scale | min << 4), qs[64], d (f16), dmin (f16); value = d*sc*q - dmin*m
    for sub-block j of 16, q in 0..3. quantize_row_q2_K_ref: make_qkx2_quants per sub-block with weights
    |x| and absolute error, then 4-bit scales and mins against the largest of each."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, mins = _make_qkx2_quants(sub, 3, -0.5, 0.1, 15, w=np.abs(sub), use_mad=True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 15.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 15.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.rint(inv_scale[:, None] * scales).astype(np.uint8)
    lm = np.rint(inv_min[:, None] * mins).astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / 15.0, 0.0).astype(np.float32)
    dmin = np.where(max_min > 0, max_min / 15.0, 0.0).astype(np.float32)

    # final levels against the scales as stored; a zero scale decodes every level to -dmin m: level 0
    dl = _f16_round(d)[:, None] * ls.astype(np.float32)  # [nb, 16]
    ml = _f16_round(dmin)[:, None] * lm.astype(np.float32)
    safe_dl = np.where(dl != 0, dl, 1.0)
    L = np.clip(np.rint((x.reshape(nb, 16, 16) + ml[..., None]) / safe_dl[..., None]), 0, 3)
    L = np.where((dl != 0)[..., None], L, 0).reshape(nb, 256)
    return np.concatenate([ls | (lm << 4), _pack_2bit(L), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _make_q3_quants(x: np.ndarray, nmax: int = 4) -> np.ndarray:
    """Symmetric scale for sub-blocks x [n, 16]; ggml-quants.c make_q3_quants(do_rmse=true): levels
    nearest to -nmax x / max (max: the value of largest |x|), then up to 5 sweeps that move one level at a
    time when that raises sum(w x l)^2 / sum(w l^2) (weights x^2), in ggml's element order. Returns the
    signed scale [n] (0 for an all-zero sub-block)."""
    n = x.shape[0]
    vmax = x[np.arange(n), np.abs(x).argmax(axis=1)]
    empty = np.abs(vmax) < 1e-15  # ggml's GROUP_MAX_EPS
    iscale = -nmax / np.where(empty, 1.0, vmax)
    L = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx = (w * x * L).sum(axis=1)
    suml2 = (w * L * L).sum(axis=1)
    for _ in range(5):  # a sweep that changes nothing leaves the state as it is: no need to stop early
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            new_l = np.clip(np.rint(xi * sl2 / np.where(pos, slx, 1.0)), -nmax, nmax - 1)
            slx_new = slx + wi * xi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            take = pos & (new_l != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[:, i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    return np.where(empty, 0.0, scale).astype(np.float32)


def _q3_k_blocks(x: np.ndarray) -> np.ndarray:
    """block_q3_K: hmask[32], qs[64], scales[12], d (f16); value = d * (sc - 32) * (q - 4) for sub-block
    j of 16, q in 0..7: its low 2 bits in qs, its third bit as bit j // 32 of hmask[j % 32]; sc 6-bit, the
    low nibble in scales[j % 8] (high half for j >= 8), the high 2 bits in scales[8 + j % 4] at bit
    2 (j // 4). quantize_row_q3_K_ref: make_q3_quants per sub-block, then 6-bit scales against the
    largest."""
    nb = x.shape[0]
    scales = _make_q3_quants(x.reshape(nb * 16, 16)).reshape(nb, 16)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    empty = max_scale == 0
    iscale = np.where(empty, 0.0, -32.0 / np.where(empty, 1.0, max_scale))
    ls = np.clip(np.rint(iscale[:, None] * scales), -32, 31).astype(np.int32) + 32  # 0..63
    d = np.where(empty, 0.0, 1.0 / np.where(empty, 1.0, iscale)).astype(np.float32)

    dl = _f16_round(d)[:, None] * (ls - 32).astype(np.float32)  # [nb, 16]
    safe_dl = np.where(dl != 0, dl, 1.0)
    L = np.clip(np.rint(x.reshape(nb, 16, 16) / safe_dl[..., None]), -4, 3) + 4
    L = np.where((dl != 0)[..., None], L, 4).astype(np.uint8).reshape(nb, 256)  # a zero scale: level 0

    hmask = np.zeros((nb, 32), np.uint8)
    for k in range(8):
        hmask |= (L[:, 32 * k : 32 * k + 32] >> 2) << k
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    hi = (ls >> 4).astype(np.uint8)
    for k in range(4):
        packed[:, 8:] |= hi[:, 4 * k : 4 * k + 4] << (2 * k)
    return np.concatenate([hmask, _pack_2bit(L & 3), packed, _f16_bytes(d)], axis=1)
