"""Weight matrices on the device: the tile layout the matmul kernels read, repacked from GGUF bytes.

A weight [n_rows, n_cols] is cut into tiles of 16 rows (the last one padded with zero rows). Each tile is
stored GGUF block by GGUF block; one tile block holds that block of all 16 rows, field by field (a Q8_0
block is the scale d, then 32 quants), and each field element-major, row-minor, so that one vector load
gives the same element of 16 rows (kernels/quants.h describes the layout and why a CPU likes it). The
device holds exactly the file's bytes, reordered, plus the padding rows of the last tile.

The repack is pure numpy on a memory-mapped GGUF tensor: a reshape, one transpose per field and a
concatenate, no Python loop per block.
"""

from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
TILE_ROWS = 16

# GGUF block fields in file order: (bytes, element size). Element size groups bytes that a kernel loads as
# one value (a half scale is 2 bytes and must stay whole); quants are single bytes.
BLOCK_FIELDS: dict[GGMLQuantizationType, tuple[tuple[int, int], ...]] = {
    T.F32: ((4, 4),),
    T.F16: ((2, 2),),
    T.BF16: ((2, 2),),
    T.Q8_0: ((2, 2), (32, 1)),  # d, qs
    T.Q4_0: ((2, 2), (16, 1)),  # d, qs
    T.Q4_1: ((2, 2), (2, 2), (16, 1)),  # d, m, qs
    # qh (32 fifth bits) byte by byte: a 4-byte element would want 64-byte vector loads, and tile blocks
    # are only 32-byte aligned
    T.Q5_0: ((2, 2), (4, 1), (16, 1)),  # d, qh, qs
    T.Q5_1: ((2, 2), (2, 2), (4, 1), (16, 1)),  # d, m, qh, qs
    T.IQ4_NL: ((2, 2), (16, 1)),  # d, qs
    T.IQ4_XS: ((2, 2), (2, 2), (4, 1), (128, 1)),  # d, scales_h, scales_l, qs
    T.Q2_K: ((16, 1), (64, 1), (2, 2), (2, 2)),  # scales, qs, d, dmin
    T.Q3_K: ((32, 1), (64, 1), (12, 1), (2, 2)),  # hmask, qs, scales, d
    T.Q4_K: ((2, 2), (2, 2), (12, 1), (128, 1)),  # d, dmin, scales, qs
    T.Q5_K: ((2, 2), (2, 2), (12, 1), (32, 1), (128, 1)),  # d, dmin, scales, qh, qs
    T.Q6_K: ((128, 1), (64, 1), (16, 1), (2, 2)),  # ql, qh, scales, d
}
SUPPORTED_TYPES = frozenset(BLOCK_FIELDS)


def block_shape(qtype) -> tuple[int, int]:
    """(columns per block, bytes per block) of a GGUF type."""
    return GGML_QUANT_SIZES[T(qtype)]


def check_shape(qtype, n_rows: int, n_cols: int) -> None:
    if T(qtype) not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"weight type {T(qtype).name} is not supported (supported: {names})")
    cols, _ = block_shape(qtype)
    if n_rows <= 0 or n_cols <= 0 or n_cols % cols:
        raise ValueError(
            f"{T(qtype).name} weight [{n_rows}, {n_cols}]: n_cols must be a positive multiple of {cols}"
        )


def row_bytes(qtype, n_cols: int) -> int:
    cols, nbytes = block_shape(qtype)
    return n_cols // cols * nbytes


def device_bytes(qtype, n_rows: int, n_cols: int) -> int:
    """Bytes upload_weight will allocate: the rows rounded up to whole tiles, in the file's row size."""
    check_shape(qtype, n_rows, n_cols)
    return -(-n_rows // TILE_ROWS) * TILE_ROWS * row_bytes(qtype, n_cols)


def repack(raw: np.ndarray, qtype, n_rows: int, n_cols: int) -> np.ndarray:
    """GGUF rows uint8 (n_rows, row_bytes) -> the tile layout, uint8 (device_bytes,)."""
    check_shape(qtype, n_rows, n_cols)
    rb = row_bytes(qtype, n_cols)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.shape != (n_rows, rb):
        raise ValueError(
            f"{T(qtype).name} weight [{n_rows}, {n_cols}]: expected uint8 ({n_rows}, {rb}), got {raw.dtype} {raw.shape}"
        )
    cols, bb = block_shape(qtype)
    nb = n_cols // cols
    n_tiles = -(-n_rows // TILE_ROWS)
    if n_tiles * TILE_ROWS != n_rows:  # zero rows decode to zero weights (scale 0) and are never stored
        raw = np.concatenate([raw, np.zeros((n_tiles * TILE_ROWS - n_rows, rb), np.uint8)])
    blocks = raw.reshape(n_tiles, TILE_ROWS, nb, bb)
    parts, off = [], 0
    for size, elsize in BLOCK_FIELDS[T(qtype)]:
        f = blocks[..., off : off + size].reshape(n_tiles, TILE_ROWS, nb, size // elsize, elsize)
        parts.append(f.transpose(0, 2, 3, 1, 4).reshape(n_tiles, nb, TILE_ROWS * size))
        off += size
    assert off == bb, (qtype, off, bb)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
    return np.ascontiguousarray(out).reshape(-1)


@dataclass
class DeviceWeight:
    """A 2-D weight on the device, logical shape [n_rows, n_cols] (GGUF ne = [n_cols, n_rows])."""

    qtype: GGMLQuantizationType
    n_rows: int
    n_cols: int
    nbytes: int  # device bytes of all its buffers
    buffers: dict[str, cl.Buffer] = field(default_factory=dict)  # "tiles": the tile layout above

    @property
    def n_tiles(self) -> int:
        return -(-self.n_rows // TILE_ROWS)


def upload_weight(rt, raw: np.ndarray, qtype, n_rows: int, n_cols: int, label: str) -> DeviceWeight:
    """Repack a GGUF tensor's bytes (uint8 (n_rows, row_bytes), as stored) and upload them."""
    tiles = repack(raw, qtype, n_rows, n_cols)
    buf = rt.upload(tiles, label)
    return DeviceWeight(T(qtype), int(n_rows), int(n_cols), int(tiles.nbytes), {"tiles": buf})
