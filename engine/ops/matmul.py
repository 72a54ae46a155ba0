"""Matrix products and embedding lookup on quantized weights (kernels/matmul_<type>_f32.cl, get_rows.cl).

One kernel per weight type serves every batch size: a work-item owns a tile of 16 weight rows and a chunk of
tokens, decodes each column of its tile once per group of up to 8 tokens and accumulates in float32 with x
in float32 (no activation quantization), so the mat-vec, the few-token and the prompt variants differ only
in how tokens are chunked over the grid and agree to float rounding. The variant is chosen by max_tokens:

    mat-vec (1 token)        grid = tiles x 1,  tchunk 1   decode: bound by memory bandwidth
    few tokens (2..16)       grid = tiles x 1,  tchunk = max_tokens: the weight is streamed once
    prompt (> 16 tokens)     grid = tiles x ceil(max_tokens / 64), tchunk 64: x chunk stays in L2

tests/bench_matmul.py prints the bandwidth and GFLOP/s figures of every type (not part of the test run).
"""

import os

import numpy as np
import pyopencl as cl
from gguf import GGMLQuantizationType
from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.ops.norm import check_buffer
from nextn.ops.weights import SUPPORTED_TYPES, DeviceWeight, block_shape

T = GGMLQuantizationType

FEW_TOKENS = 16  # up to this many tokens one chunk covers the whole batch (speculative verification)
PROMPT_CHUNK = 64  # tokens per work-item in the prompt variant: 64 x n_cols floats of x fit a CPU's L2
CPU_TILES_PER_GROUP = 4  # see MatmulOps._local_size
PREFETCH_BYTES = 2048  # how far ahead a CPU kernel prefetches its weight stream (1 and 4 KiB measured worse)
GET_ROWS_GROUP = 16  # pieces of a row per get_rows work-group on a CPU
GET_ROWS_COLS = 16  # columns per get_rows work-item for the float types (the quantized ones do a block)

KERNEL_NAMES = {t: t.name.lower() for t in SUPPORTED_TYPES}
# GPU mat-vec kernels (kernels/matvec_<type>_f32_gpu.cl): a work-group of MV_WARPS 32-wide warps per 16-row
# tile, lanes splitting each tile block's columns, so a decode product spreads over the whole GPU with
# coalesced loads. MM_KERNEL gives a GPU one work-item per tile (64 for a 1024-row weight: one SM of an
# H100, where the bench model decoded at 1% of the bandwidth bound).
GPU_MATVEC_TYPES = frozenset({T.Q8_0})
MV_WARPS = 4
ARG_N_TOKENS = 5  # index of n_tokens in kernel_matmul_*'s argument list (set before each launch)
# Types whose several-token tiles subtract min * sum(x over a block) (MM_BLOCK_END_MIN in kernels/quants.h),
# and that block's columns (the others use it only in the one-token shortcut of a build without batch
# invariance). Every 16-row tile sums x for every token and block; a prompt step computes the sums once
# (kernel_x_block_sums, one launch) into MatmulOps' scratch: Q4_K's 512-token prompt step ran 1.4x faster.
XSUM_COLS = {T.Q4_K: 32, T.Q5_K: 32}


def xsum_scratch_bytes(max_tokens: int, max_cols: int, rows_per_token: int = 1) -> int:
    """MatmulOps' block-sum scratch for prompt steps of max_tokens over weights of at most max_cols columns,
    x holding rows_per_token rows per token (a MoE layer's experts used per token); 0 when the prompt variant
    never runs."""
    return 4 * max_tokens * rows_per_token * (max_cols // 16) if max_tokens > FEW_TOKENS else 0


def matmul_kernel_file(qtype) -> str:
    return f"matmul_{KERNEL_NAMES[T(qtype)]}_f32.cl"


class MatmulOps:
    """Builds the matmul / get_rows programs lazily (once per weight type) and prepares launches."""

    def __init__(self, rt, *, batch_invariant: bool = True, xsum_bytes: int = 0):
        """xsum_bytes: the block-sum scratch (xsum_scratch_bytes); 0: every tile sums x itself."""
        self.rt = rt
        # shared by every prompt-variant product: each launch list writes the sums of its x just before its
        # product reads them, and the queue is in order
        self.xsum = rt.alloc(xsum_bytes, "act.xsum") if xsum_bytes else None
        self._programs: dict[tuple[str, T], cl.Program] = {}
        self.is_cpu = bool(rt.device.type & cl.device_type.CPU)
        # one-token products of GPU_MATVEC_TYPES use the GPU kernel. Opt-in until it has run on a GPU: it is
        # checked against numpy on PoCL (tests/test_matmul.py forces it), but no GPU was left to time or even
        # compile it when it was written; NEXTN_GPU_MATVEC=1 turns it on for GPU devices.
        self.gpu_matvec = not self.is_cpu and os.environ.get("NEXTN_GPU_MATVEC") == "1"
        # software prefetch helps a CPU stream the weights (kernels/quants.h); a GPU has no use for it
        self.defines = {"MM_PREFETCH_BYTES": PREFETCH_BYTES} if self.is_cpu else {}
        # one arithmetic for every token group size (kernels/quants.h): a request's logits do not depend on
        # what else shares its step
        self.batch_invariant = batch_invariant
        if batch_invariant:
            self.defines["MM_BATCH_INVARIANT"] = 1

    def _program(self, kind: str, qtype) -> cl.Program:
        key = (kind, T(qtype))
        if key not in self._programs:
            if T(qtype) not in SUPPORTED_TYPES:
                raise ValueError(f"{kind}: weight type {T(qtype).name} is not supported")
            if kind == "matmul":
                self._programs[key] = self.rt.build(matmul_kernel_file(qtype), self.defines)
            else:
                self._programs[key] = self.rt.build("get_rows.cl")
        return self._programs[key]

    def _local_size(self, kernel: cl.Kernel) -> int:
        """Tiles per work-group. On a CPU (PoCL runs a work-group as a loop on one thread) 4 tiles of 16 rows
        amortise the work-group overhead and leave enough groups to balance the cores; one fixed size also
        means one machine-code compile per kernel (PoCL compiles per local size). Elsewhere a multiple of
        the kernel's preferred size."""
        limit = int(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.rt.device))
        if self.is_cpu:
            return max(1, min(CPU_TILES_PER_GROUP, limit))
        pref = int(
            kernel.get_work_group_info(
                cl.kernel_work_group_info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE, self.rt.device
            )
        )
        return max(1, min(limit, max(pref, 64)))

    def matmul(
        self,
        w: DeviceWeight,
        x: cl.Buffer,
        y: cl.Buffer,
        max_tokens: int,
        token_var: int = VAR_N_TOKENS,
        accumulate: bool = False,
        y_stride: int | None = None,
        y_offset: int = 0,
    ) -> list[Launch]:
        """y[t, y_offset + r] (+)= sum_c w[r, c] * x[t, c] for t < vars[token_var] <= max_tokens.

        x: float32 [n_tokens, n_cols]; y: float32 [n_tokens, y_stride] (must not alias x); y_stride defaults
        to n_rows. A stride and offset let several weights write side by side into one row (Q|K|V when the
        three tensors have different types).
        """
        if max_tokens <= 0:
            raise ValueError(f"matmul: max_tokens={max_tokens}")
        ldy = w.n_rows if y_stride is None else y_stride
        if y_offset < 0 or y_offset + w.n_rows > ldy:
            raise ValueError(f"matmul: rows [{y_offset}, {y_offset + w.n_rows}) do not fit a y row of {ldy}")
        check_buffer(x, 4 * max_tokens * w.n_cols, "matmul x")
        check_buffer(y, 4 * max_tokens * ldy, "matmul y")
        if max_tokens == 1:
            tchunk = 1
        elif max_tokens <= FEW_TOKENS:
            tchunk = max_tokens
        else:
            tchunk = PROMPT_CHUNK
        n_chunks = -(-max_tokens // tchunk)
        gpu_mv = max_tokens == 1 and self.gpu_matvec and w.qtype in GPU_MATVEC_TYPES
        if gpu_mv:
            name = f"matvec_{KERNEL_NAMES[w.qtype]}_f32_gpu"
            k = self.rt.kernel(self.rt.build(f"{name}.cl", {"MV_WARPS": MV_WARPS}), f"kernel_{name}")
        else:
            k = self.rt.kernel(self._program("matmul", w.qtype), f"kernel_matmul_{KERNEL_NAMES[w.qtype]}_f32")
        sums = [] if gpu_mv else self._xsum_launch(w, x, max_tokens, tchunk, token_var)
        xsum_arg = [] if gpu_mv else [self.xsum if sums else None]  # the GPU mat-vec kernel has no xsum
        k.set_args(w.buffers["tiles"], x, y, np.int32(w.n_rows), np.int32(w.n_cols), np.int32(0), np.int32(tchunk),
                   np.int32(1 if accumulate else 0), np.int32(ldy), np.int32(y_offset), *xsum_arg)
        if gpu_mv:  # one work-group per tile
            wg, n_groups = 32 * MV_WARPS, w.n_tiles
        else:
            wg = self._local_size(k)
            n_groups = -(-w.n_tiles // wg)
        return sums + [
            Launch(
                k,
                (n_groups * wg, n_chunks),
                (0, 0),
                (wg, 1),
                [(ARG_N_TOKENS, token_var)],
                token_var,
                name=f"matmul_{KERNEL_NAMES[w.qtype]}[{w.n_rows}x{w.n_cols}]",
                weight_bytes=w.nbytes,
            )
        ]

    def _xsum_launch(self, w: DeviceWeight, x: cl.Buffer, max_rows: int, tchunk: int, token_var: int,
                     bounds: cl.Buffer | None = None, n_expert: int = 0) -> list[Launch]:
        """The launch writing the block sums of x's rows into the scratch, for a prompt-variant product of a
        type in XSUM_COLS that the scratch holds; else none (the kernel then sums per tile: the same bits).
        Rows: the step's vars[token_var] tokens, or with bounds (an expert-indexed product) the bounds[n_expert]
        rows its router gathered, of at most max_rows."""
        ncol = XSUM_COLS.get(w.qtype)
        if ncol is None or tchunk != PROMPT_CHUNK or self.xsum is None or \
                self.xsum.size < 4 * max_rows * (w.n_cols // 16):
            return []
        k = self.rt.kernel(self._program("matmul", w.qtype), "kernel_x_block_sums")
        k.set_args(x, self.xsum, np.int32(w.n_cols), np.int32(ncol), np.int32(max_rows), bounds, np.int32(n_expert))
        if bounds is None:  # one work-item per token of the step
            return [Launch(k, (0,), (1,), None, [(4, token_var)], token_var, name="x_block_sums")]
        return [Launch(k, (max_rows,), (0,), None, name="x_block_sums")]

    def matmul_id(
        self,
        w: DeviceWeight,
        x: cl.Buffer,
        y: cl.Buffer,
        bounds: cl.Buffer,
        max_tokens: int,
        max_rows: int,
        token_var: int = VAR_N_TOKENS,
        accumulate: bool = False,
        y_stride: int | None = None,
        y_offset: int = 0,
    ) -> list[Launch]:
        """Expert-indexed product (mul_mat_id): y[s, y_offset + r] (+)= sum_c w_e[r, c] * x[s, c] for every
        row s in expert e's range [bounds[e], bounds[e + 1]).

        w: an expert weight from nextn.ops.moe.upload_experts (n_expert experts of w.n_rows rows, each padded
        to whole tiles); bounds: int32 [n_expert + 1], written on the device (the MoE router) before the
        launch; x: float32 [max_rows, n_cols] grouped by expert; y: float32 [max_rows, y_stride] (not
        aliasing x). An expert's range holds at most vars[token_var] <= max_tokens rows (a token picks an
        expert at most once): max_tokens picks the token chunking as in matmul(), and the grid grows with the
        batch.
        """
        n_expert = getattr(w, "n_expert", None)
        if n_expert is None:
            raise ValueError("matmul_id: the weight was not uploaded with nextn.ops.moe.upload_experts")
        if max_tokens <= 0 or max_rows <= 0:
            raise ValueError(f"matmul_id: max_tokens={max_tokens}, max_rows={max_rows}")
        ldy = w.n_rows if y_stride is None else y_stride
        if y_offset < 0 or y_offset + w.n_rows > ldy:
            raise ValueError(
                f"matmul_id: rows [{y_offset}, {y_offset + w.n_rows}) do not fit a y row of {ldy}"
            )
        check_buffer(x, 4 * max_rows * w.n_cols, "matmul_id x")
        check_buffer(y, 4 * max_rows * ldy, "matmul_id y")
        check_buffer(bounds, 4 * (n_expert + 1), "matmul_id bounds")
        if max_tokens == 1:
            tchunk = 1
        elif max_tokens <= FEW_TOKENS:
            tchunk = max_tokens
        else:
            tchunk = PROMPT_CHUNK
        name = KERNEL_NAMES[w.qtype]
        k = self.rt.kernel(self._program("matmul", w.qtype), f"kernel_matmul_id_{name}_f32")
        sums = self._xsum_launch(w, x, max_rows, tchunk, token_var, bounds, n_expert)
        k.set_args(
            w.buffers["tiles"],
            x,
            y,
            np.int32(w.n_rows),
            np.int32(w.n_cols),
            bounds,
            np.int32(tchunk),
            np.int32(1 if accumulate else 0),
            np.int32(ldy),
            np.int32(y_offset),
            np.int32(n_expert),
            self.xsum if sums else None,
        )
        wg = self._local_size(k)
        n_groups = -(-w.n_tiles // wg)
        # dim 1 walks (chunk, expert) chunk-major: one chunk per expert covers a batch of up to tchunk tokens;
        # beyond that n_expert * ceil(n / tchunk) <= n_expert + ceil(n_expert / tchunk) * n
        per_token = 0 if max_tokens <= tchunk else -(-n_expert // tchunk)
        return sums + [
            Launch(
                k,
                (n_groups * wg, n_expert),
                (0, per_token),
                (wg, 1),
                [],
                token_var,
                name=f"matmul_id_{name}[{n_expert}x{w.n_rows}x{w.n_cols}]",
                weight_bytes=w.nbytes // n_expert,  # per expert a token uses
            )
        ]

    def get_rows(
        self, w: DeviceWeight, ids: cl.Buffer, y: cl.Buffer, max_tokens: int, token_var: int = VAR_N_TOKENS
    ) -> list[Launch]:
        """y[t, :] = dequant(w[ids[t], :]) as float32 for t < vars[token_var]; ids int32 [n_tokens].

        An id outside [0, n_rows) gives a row of zeros rather than a read out of bounds.
        """
        if max_tokens <= 0:
            raise ValueError(f"get_rows: max_tokens={max_tokens}")
        check_buffer(ids, 4 * max_tokens, "get_rows ids")
        check_buffer(y, 4 * max_tokens * w.n_cols, "get_rows y")
        cols, _ = block_shape(w.qtype)
        per_item = cols if cols > 1 else GET_ROWS_COLS
        n_items = -(-w.n_cols // per_item)
        k = self.rt.kernel(self._program("get_rows", w.qtype), f"kernel_get_rows_{KERNEL_NAMES[w.qtype]}")
        k.set_args(w.buffers["tiles"], ids, y, np.int32(w.n_rows), np.int32(w.n_cols), np.int32(0))
        wg = GET_ROWS_GROUP if self.is_cpu else 64  # fixed: one PoCL compile per kernel
        # the grid has at least one token even when n_tokens is 0: the kernel bounds itself by n_tokens
        return [
            Launch(
                k,
                (-(-n_items // wg) * wg, 0),
                (0, 1),
                (wg, 1),
                [(5, token_var)],
                token_var,
                name=f"get_rows_{KERNEL_NAMES[w.qtype]}[{w.n_rows}x{w.n_cols}]",
                weight_bytes=w.nbytes // w.n_rows,
            )
        ]
