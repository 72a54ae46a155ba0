"""KV-cache store and causal multi-sequence attention (kernels/attention.cl).

The cache of one layer is K and V, each [n_seq, n_head_kv, n_ctx] rows of head_dim values (head-major: a kv
head's positions are contiguous, kernels/kv_types.h): token t of a batch is stored at (seqs[t], each kv head,
positions[t]) and attends to positions 0..positions[t] of its own sequence. A row is
half precision, or quantized in ggml's q8_0 / q4_0 blocks (llama-server's --cache-type-k/-v; kv_types.h).

A sliding-window layer (step35) attends to the last `window` positions only; its cache may be a ring of
`ring_rows(window, n_batch)` rows per sequence instead of n_ctx (position p in row p % rows): memory bounded
by the window plus one batch.
"""

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_SPLITS, VAR_N_TOKENS, Launch
from nextn.ops.norm import check_buffer


KV_TYPES = {"f16": 0, "q8_0": 1, "q4_0": 2}  # the kernels' K_TYPE / V_TYPE values


def kv_row_bytes(kv_type: str, head_dim: int) -> int:
    """Bytes of one cache row (one position of one kv head) of `kv_type`."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"KV cache type {kv_type!r} (supported: {', '.join(KV_TYPES)})")
    if kv_type != "f16" and head_dim % 32:
        raise ValueError(f"KV cache type {kv_type} needs a head size that is a multiple of 32, not {head_dim}")
    return {"f16": 2 * head_dim, "q8_0": head_dim // 32 * 34, "q4_0": head_dim // 32 * 18}[kv_type]


def kv_cache_bytes(n_seq: int, n_ctx: int, n_head_kv: int, head_dim: int, k_type: str = "f16",
                   v_type: str = "f16") -> int:
    """Bytes of K + V of one layer."""
    return n_seq * n_ctx * n_head_kv * (kv_row_bytes(k_type, head_dim) + kv_row_bytes(v_type, head_dim))


def ring_rows(window: int, n_batch: int, n_ctx: int) -> int:
    """Rows per sequence of a sliding-window layer's ring: a batch of up to n_batch tokens of one sequence
    (all stored before any attends) must not overwrite a row one of them still sees. n_ctx when that is
    fewer (then the cache is the plain layout)."""
    return min(n_ctx, window + n_batch - 1)


def ring_defines(n_ctx: int, rows: int | None) -> dict:
    """KV_RING when a layer's cache holds fewer rows than n_ctx per sequence."""
    return {} if rows is None or rows >= n_ctx else {"KV_RING": rows}


def kv_defines(k_type: str, v_type: str) -> dict:
    """Build defines of the KV types (none for f16: the default, one binary for existing caches)."""
    return {name: KV_TYPES[t] for name, t in (("K_TYPE", k_type), ("V_TYPE", v_type)) if t != "f16"}


def _n_seq(cache, n_ctx: int, n_head_kv: int, head_dim: int, kv_type: str = "f16") -> int:
    n_seq = cache.size // (n_ctx * n_head_kv * kv_row_bytes(kv_type, head_dim))
    if n_seq < 1:
        raise ValueError(f"KV cache buffer of {cache.size} bytes holds no sequence of n_ctx={n_ctx}")
    return n_seq


def kv_store(rt, k, v, k_cache, v_cache, positions, seqs, n_head_kv: int, head_dim: int, n_ctx: int,
             max_tokens: int) -> list[Launch]:
    """Write k, v float32 [n_tokens, n_head_kv*head_dim] into the half caches [n_seq, n_head_kv, n_ctx,
    head_dim] at (seqs[t], each kv head, positions[t])."""
    kv_dim = n_head_kv * head_dim
    if head_dim % 4:
        raise ValueError(f"kv_store: head_dim = {head_dim} must be a multiple of 4")
    check_buffer(k, 4 * max_tokens * kv_dim, "kv_store k")
    check_buffer(v, 4 * max_tokens * kv_dim, "kv_store v")
    n_seq = min(_n_seq(k_cache, n_ctx, n_head_kv, head_dim), _n_seq(v_cache, n_ctx, n_head_kv, head_dim))
    kern = rt.kernel(rt.build("attention.cl"), "kernel_kv_store")
    kern.set_args(k, v, k_cache, v_cache, positions, seqs, np.int32(kv_dim), np.int32(head_dim), np.int32(n_ctx),
                  np.int32(n_seq), np.int32(0))
    return [Launch(kern, (kv_dim // 4, 0), (0, 1), None, [(10, VAR_N_TOKENS)], VAR_N_TOKENS, name="kv_store")]


def k_tile_stride(head_dim: int, shape: dict) -> int:
    """Row stride of kernel_attention's K tile (its KS). A group's score units read rows CB * VW apart, which
    a stride of head_dim puts in one local-memory bank on a GPU (VW 4): one float of padding. On the CPU shape
    (VW 16) the padding only misaligns the vector loads (tiled prompt attention 5-20% slower, measured)."""
    return head_dim if shape["VW"] == 16 else head_dim + 1


def local_bytes(head_dim: int, n_rep: int, shape: dict) -> int:
    """Local memory of kernel_attention (Qs, Ks, Vs, Sc, row state, token state; as in the kernel)."""
    r, bc, bq = shape["BQ"] * n_rep, shape["BC"], shape["BQ"]
    return 4 * (r * head_dim + bc * k_tile_stride(head_dim, shape) + bc * head_dim + r * bc + 5 * r) + 8 * bq


MAX_SPLITS = 32  # a context is split into at most this many parts (the partials' memory)


def split_size(n_ctx: int) -> int:
    """Positions per split of the KV walk (kernel_attention's KV_SPLIT): 512, or more so that a context of
    n_ctx has at most MAX_SPLITS. It fixes the arithmetic, so every attention of a model uses this one."""
    size = 512
    while size * MAX_SPLITS < n_ctx:
        size *= 2
    return size


def max_splits(n_ctx: int, size: int) -> int:
    """Splits of `size` positions a context of n_ctx holds at most."""
    return -(-n_ctx // size)


class KvSplit:
    """Flash-decoding for the steps of few tokens (decode, speculative verify) at a long context: attention
    runs as n_split groups per (token block, kv head), each over one split of the KV, and a combine launch
    folds their partials. The bits of every output are the same split or not (attention.cl), so whether to
    split is a matter of speed alone: `count` splits when the other grid dimensions leave compute units idle.

    One per model (the cache holds it), shared by every attention layer: partial buffers sized for the widest
    layer, `max_tokens` rows and the context's splits, made as the layers' launches are built."""

    def __init__(self, rt, n_ctx: int, max_tokens: int, n_head: int, head_dim: int, mode: str = "auto",
                 size: int | None = None):
        """Partials for layers of up to n_head heads of head_dim; size overrides split_size(n_ctx) (tests:
        several splits in a small cache)."""
        self.max_tokens, self.n_head, self.head_dim = max_tokens, n_head, head_dim
        self.size = size or split_size(n_ctx)
        self.max_splits = max_splits(n_ctx, self.size)
        self.compute_units = int(rt.device.max_compute_units)
        self.mode = mode  # "auto", or "never" / "always" (tests and the bench compare them)
        self.min_groups = None  # fewest kv heads of any layer built: the grid's smallest second dimension
        rows = self.max_splits * max_tokens * n_head
        # one pair for every layer (kernels do not keep their buffer arguments alive: never replaced)
        self.part_o = rt.alloc(4 * rows * head_dim, "attention.split_o")
        self.part_ml = rt.alloc(4 * rows * 2, "attention.split_ml")

    @staticmethod
    def bytes_needed(n_ctx: int, max_tokens: int, n_head: int, head_dim: int) -> int:
        """Device bytes of the partials: (O_run, M, L) per split, token and head."""
        return 4 * max_splits(n_ctx, split_size(n_ctx)) * max_tokens * n_head * (head_dim + 2)

    def parts(self, n_head: int, head_dim: int, n_head_kv: int):
        """(part_o, part_ml) for a layer of n_head heads of head_dim and n_head_kv kv heads."""
        if n_head > self.n_head or head_dim > self.head_dim:
            raise ValueError(f"attention split partials hold {self.n_head} heads of {self.head_dim}, not "
                             f"{n_head} of {head_dim}")
        self.min_groups = min(self.min_groups or n_head_kv, n_head_kv)
        return self.part_o, self.part_ml

    def count(self, n_tokens: int, max_pos: int) -> int:
        """Splits for a step of n_tokens whose furthest token is at max_pos (1: no split)."""
        n = max_pos // self.size + 1
        if self.mode == "never" or n < 2 or n_tokens > self.max_tokens or self.min_groups is None:
            return 1
        if self.mode == "always":
            return n
        # one group per kv head and sequence (at most one per token); split when that leaves units idle (on
        # 2 CPU cores, 2 groups split 9 ways decoded within noise of unsplit: 0.94-1.06x, bench_kv_split.py)
        return n if self.min_groups * n_tokens < self.compute_units else 1


def default_shape(rt, head_dim: int, n_rep: int) -> dict:
    """Tile shape per device kind; see the header of attention.cl for what each define means."""
    if rt.device.type & cl.device_type.CPU:
        # PoCL: a work-group runs on one core, work-item after work-item; float16 vectors are one AVX-512
        # register. 16 work-items, 4x2 register blocks (measured best of WG 8..32, BQ 4..16, BC 32/64,
        # RB 2..8, OB 1..2 at head_dim 128, n_rep 2, for both 1 and 512 query tokens). The decode path takes
        # sequences of up to DEC_T tokens in a block (a decode token, a verify step of up to 16 rows).
        shape = {"WG": 16, "BQ": 8, "BC": 32, "VW": 16, "RB": 4, "CB": 2, "OB": 2, "DEC_T": max(1, 16 // n_rep)}
    else:
        # GPU: 64 work-items (two warps / one wavefront), about 16 query rows per group
        bq = 1
        while bq * 2 * n_rep <= 16:
            bq *= 2
        shape = {"WG": 64, "BQ": bq, "BC": 32, "VW": 4, "RB": 2, "CB": 1, "OB": 1}
    while head_dim % shape["VW"]:
        shape["VW"] //= 2  # head_dim % 4 == 0 is required, so this stops at 4
    # One vector per head row (head_dim 16 at VW 16) makes PoCL 3.1's work-group compiler abort
    # ("Incoming edges to non-entry block!" in ParallelRegion::Verify); two or more compile and run.
    while head_dim // shape["VW"] < 2 and shape["VW"] > 4:
        shape["VW"] //= 2
    limit = int(rt.device.local_mem_size) - 256
    while local_bytes(head_dim, n_rep, shape) > limit and shape["BC"] > max(8, shape["VW"]):
        shape["BC"] //= 2
    while local_bytes(head_dim, n_rep, shape) > limit and shape["BQ"] > 1:
        shape["BQ"] //= 2
    while (shape["BQ"] * n_rep) % shape["RB"]:
        shape["RB"] //= 2
    while (shape["BC"] // shape["VW"]) % shape["CB"]:
        shape["CB"] //= 2
    while (head_dim // shape["VW"]) % shape["OB"]:
        shape["OB"] //= 2
    return shape


def attention(rt, q, k_cache, v_cache, positions, seqs, out, n_head: int, n_head_kv: int, head_dim: int,
              n_ctx: int, scale: float, max_tokens: int, *, shape: dict | None = None, k_type: str = "f16",
              v_type: str = "f16", window: int = 0, rows: int | None = None,
              split: KvSplit | None = None, gate=None) -> list[Launch]:
    """out[t, h] = softmax(scale * q[t, h] . K[seq, 0..pos, h // n_rep]) V[...] for every token of the batch.

    q: float32 [n_tokens, n_head, head_dim]; out: float32 [n_tokens, n_head*head_dim]; positions, seqs
    int32 [n_tokens]. `shape` overrides the tile shape (WG, BQ, BC, VW, RB, CB, OB; DEC_T for the decode path)
    for tests and tuning.
    k_type / v_type: the caches' row types (KV_TYPES). window > 0: a token sees only the last `window`
    positions (its own included); rows: the cache's rows per sequence when it is a ring (ring_rows).
    split: the model's KvSplit; a step of at most split.max_tokens tokens may then run split over the KV
    (step variable VAR_N_SPLITS; the combine launch runs only when it is 2 or more). shape["KV_SPLIT"]
    overrides the positions per split (tests); default split_size(n_ctx).
    gate: (qkv, row_floats) for qwen35's gated attention: out[t, h] *= sigmoid(the head_dim gate values after
    Q head h in qkv row t), written with the output (ops/qkv.py's q_gate layout).
    """
    if n_head % n_head_kv:
        raise ValueError(f"attention: n_head={n_head} is not a multiple of n_head_kv={n_head_kv}")
    if head_dim % 4:
        raise ValueError(f"attention: head_dim={head_dim} must be a multiple of 4")
    n_rep = n_head // n_head_kv
    shape = dict(shape or default_shape(rt, head_dim, n_rep))
    wg, bq, bc, vw = shape["WG"], shape["BQ"], shape["BC"], shape["VW"]
    shape.setdefault("OB", 1)
    if shape.get("DEC_T", 1) < 1:
        raise ValueError(f"attention: DEC_T={shape['DEC_T']} must be at least 1")
    if (wg % bq or head_dim % vw or bc % vw or (bq * n_rep) % shape["RB"] or (bc // vw) % shape["CB"]
            or (head_dim // vw) % shape["OB"]):
        raise ValueError(f"attention: shape {shape} needs WG % BQ == 0, head_dim % VW == 0, BC % VW == 0, "
                         f"BQ * n_rep % RB == 0, BC / VW % CB == 0 and head_dim / VW % OB == 0 "
                         f"(n_rep = {n_rep})")
    if local_bytes(head_dim, n_rep, shape) > int(rt.device.local_mem_size):
        raise ValueError(f"attention: shape {shape} needs more local memory than the device has")
    check_buffer(q, 4 * max_tokens * n_head * head_dim, "attention q")
    check_buffer(out, 4 * max_tokens * n_head * head_dim, "attention out")
    seq_rows = n_ctx if rows is None else rows
    n_seq = min(_n_seq(k_cache, seq_rows, n_head_kv, head_dim, k_type),
                _n_seq(v_cache, seq_rows, n_head_kv, head_dim, v_type))
    shape.setdefault("KV_SPLIT", split.size if split is not None else split_size(n_ctx))
    if shape["KV_SPLIT"] % bc:
        raise ValueError(f"attention: KV_SPLIT={shape['KV_SPLIT']} is not a multiple of BC={bc}")
    defines = {"D": head_dim, "N_REP": n_rep, "KS": k_tile_stride(head_dim, shape), **shape,
               **kv_defines(k_type, v_type), **ring_defines(n_ctx, rows)}
    if window > 0:
        defines["SWA_W"] = window
    if gate is not None:
        check_buffer(gate[0], 4 * max_tokens * gate[1], "attention gate")
        defines["GATE_ROW"] = gate[1]
    gate_buf = None if gate is None else gate[0]
    prg = rt.build("attention.cl", defines)
    kern = rt.kernel(prg, "kernel_attention")
    splits = split is not None and max_tokens <= split.max_tokens
    part_o, part_ml = split.parts(n_head, head_dim, n_head_kv) if splits else (None, None)
    part_tokens = split.max_tokens if splits else 0
    kern.set_args(q, k_cache, v_cache, positions, seqs, out, np.int32(n_head), np.int32(n_head_kv),
                  np.int32(n_ctx), np.int32(n_seq), np.float32(scale), np.int32(0), part_o, part_ml,
                  np.int32(part_tokens), gate_buf)
    # dim 0: ceil(n_tokens / BQ) groups of WG work-items (n_tokens * WG/BQ rounded up to WG); dim 2: splits
    if not splits:
        return [Launch(kern, (0, n_head_kv, 1), (wg // bq, 0, 0), (wg, 1, 1), [(11, VAR_N_TOKENS)],
                       VAR_N_TOKENS, name="attention")]
    combine = rt.kernel(prg, "kernel_attention_combine")
    combine.set_args(part_o, part_ml, out, np.int32(n_head), np.int32(part_tokens), np.int32(0), np.int32(0),
                     gate_buf)
    return [Launch(kern, (0, n_head_kv, 0), (wg // bq, 0, 1), (wg, 1, 1), [(11, VAR_N_TOKENS)],
                   name="attention", grid_vars=(VAR_N_TOKENS, VAR_N_TOKENS, VAR_N_SPLITS)),
            Launch(combine, (head_dim // vw, n_head, 0), (0, 0, 1), None,
                   [(5, VAR_N_SPLITS), (6, VAR_N_TOKENS)], name="attention_combine",
                   run_if=(VAR_N_SPLITS, 2))]
