"""Mixture-of-experts FFN (qwen35moe: softmax gating, top-n_used, normalized weights) on the device.

Everything stays on the device, so the launches run inside a prepared plan with no host sync:

    logits = cur @ ffn_gate_inp^T                   matmul                      [n_tokens, n_expert]
    route: softmax, top n_used, normalize           kernel_moe_route            ids, wts [n_tokens, n_used]
    group the n_tokens * n_used pairs by expert     kernel_moe_sort (1 group)   bounds, pair_token, pair_slot
    xg[row] = cur[pair_token[row]]                  gather_rows                 [n_pairs, n_embd]
    gu = gate | up of each row's expert             matmul_id x 2 (one if fused) [n_pairs, 2 n_ff_exp]
    act = silu(gate) * up                           swiglu_fused                [n_pairs, n_ff_exp]
    yd = down of each row's expert                  matmul_id                   [n_pairs, n_embd]
    x[t] += sum_k wts[t, k] * yd[pair_slot[t, k]]   kernel_moe_combine          residual add

Rows are grouped by expert so that all the tokens routed to one expert share one pass over its weights (the
prompt case), while a decode step reads only its n_used experts: matmul_id's grid walks (chunk, expert) and
the chunks of unused experts exit at once. kernels/moe.cl describes the kernels.

Expert tensors (ffn_gate_exps / ffn_up_exps ne (n_embd, n_ff_exp, n_expert), ffn_down_exps ne (n_ff_exp,
n_embd, n_expert)) are stored expert after expert, each a [rows, cols] matrix in the tile layout of
nextn.ops.weights, padded to whole tiles so every expert starts on a tile.
"""

from dataclasses import dataclass, replace

import numpy as np
import pyopencl as cl
from gguf import GGMLQuantizationType as T
from nextn.ops.elementwise import gather_rows
from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.ops.norm import check_buffer
from nextn.ops.elementwise import swiglu_fused
from nextn.ops.weights import TILE_ROWS, DeviceWeight, check_shape, device_bytes, repack, row_bytes

SORT_WG_CPU = 16  # PoCL runs a work-group as a loop on one core: few work-items, each scanning the pairs
SORT_WG_GPU = 64
ELEM_LOCAL = 64  # local size of the combine / shared-add kernels (a fixed size: one PoCL compile each)
UPLOAD_CHUNK_BYTES = 64 << 20  # experts are repacked in groups of about this size (bounded host memory)


def experts_bytes(qtype, n_expert: int, rows_per_expert: int, n_cols: int) -> int:
    """Device bytes of upload_experts' weight: every expert rounded up to whole tiles of 16 rows."""
    if n_expert <= 0:
        raise ValueError(f"experts: n_expert={n_expert}")
    return n_expert * device_bytes(qtype, rows_per_expert, n_cols)


def upload_experts(
    rt, raw: np.ndarray, qtype, n_expert: int, rows_per_expert: int, n_cols: int, name: str
) -> DeviceWeight:
    """Repack a 3-D expert tensor's GGUF bytes (uint8, n_expert * rows_per_expert * row_bytes, expert after
    expert) and upload it. The result has n_rows = rows_per_expert and the attributes n_expert and
    rows_per_expert (what MatmulOps.matmul_id reads); expert e's tiles start at tile e * n_tiles."""
    return _upload_expert_parts(rt, [raw], qtype, n_expert, [rows_per_expert], n_cols, name)


def _upload_expert_parts(
    rt, raws, qtype, n_expert: int, part_rows: list[int], n_cols: int, name: str
) -> DeviceWeight:
    """Expert e = the rows of expert e of each part in turn, padded to whole tiles, repacked and uploaded."""
    rows_per_expert = sum(part_rows)
    check_shape(qtype, rows_per_expert, n_cols)
    rb = row_bytes(qtype, n_cols)
    parts = []
    for raw, rows in zip(raws, part_rows, strict=True):
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.size != n_expert * rows * rb:
            raise ValueError(
                f"{name}: {T(qtype).name} experts [{n_expert}, {rows}, {n_cols}] need {n_expert * rows * rb} "
                f"uint8 bytes, got {raw.dtype} {raw.shape}"
            )
        parts.append(raw.reshape(n_expert, rows, rb))
    pad = (-rows_per_expert) % TILE_ROWS
    per_expert = device_bytes(qtype, rows_per_expert, n_cols)
    tiles = np.empty(n_expert * per_expert, np.uint8)
    # repack() pads one matrix to whole tiles; doing a group of whole experts at a time pads each expert and
    # keeps the host copy of a memory-mapped file bounded (a real layer's expert tensor is hundreds of MB)
    group = max(1, UPLOAD_CHUNK_BYTES // per_expert)
    for e0 in range(0, n_expert, group):
        e1 = min(n_expert, e0 + group)
        block = [p[e0:e1] for p in parts]
        if pad:
            block.append(np.zeros((e1 - e0, pad, rb), np.uint8))
        block = np.concatenate(block, axis=1) if len(block) > 1 else np.asarray(block[0])
        tiles[e0 * per_expert : e1 * per_expert] = repack(
            block.reshape(-1, rb), qtype, (e1 - e0) * (rows_per_expert + pad), n_cols
        )
    w = DeviceWeight(
        T(qtype), int(rows_per_expert), int(n_cols), int(tiles.nbytes), {"tiles": rt.upload(tiles, name)}
    )
    w.n_expert = int(n_expert)
    w.rows_per_expert = int(rows_per_expert)
    return w


@dataclass
class MoeBuffers:
    """Scratch of one moe_ffn (shared by every layer: the layers run one after the other).

    logits [max_tokens, n_expert]; ids int32 / wts float32 [max_tokens * n_used]; bounds int32 [n_expert + 1];
    pair_token int32 [max_pairs] (the token of each expert-grouped row); pair_slot int32 [max_pairs] (the row
    of pair t * n_used + k); xg [max_pairs, n_embd] (gathered inputs, then reused for the down outputs: the
    inputs are dead once gate|up have run); gu [max_pairs, 2 n_ff_exp]; act [max_pairs, n_ff_exp]."""

    n_embd: int
    n_ff_exp: int
    n_expert: int
    n_used: int
    max_tokens: int
    logits: cl.Buffer
    ids: cl.Buffer
    wts: cl.Buffer
    bounds: cl.Buffer
    pair_token: cl.Buffer
    pair_slot: cl.Buffer
    xg: cl.Buffer
    gu: cl.Buffer
    act: cl.Buffer

    @staticmethod
    def _sizes(n_embd, n_ff_exp, n_expert, n_used, max_tokens) -> dict[str, int]:
        if min(n_embd, n_ff_exp, n_expert, n_used, max_tokens) <= 0 or n_used > n_expert:
            raise ValueError(
                f"moe buffers: n_embd={n_embd} n_ff_exp={n_ff_exp} n_expert={n_expert} n_used={n_used} "
                f"max_tokens={max_tokens}"
            )
        pairs = max_tokens * n_used
        return {
            "logits": 4 * max_tokens * n_expert,
            "ids": 4 * pairs,
            "wts": 4 * pairs,
            "bounds": 4 * (n_expert + 1),
            "pair_token": 4 * pairs,
            "pair_slot": 4 * pairs,
            "xg": 4 * pairs * n_embd,
            "gu": 4 * pairs * 2 * n_ff_exp,
            "act": 4 * pairs * n_ff_exp,
        }

    @classmethod
    def bytes_needed(cls, n_embd: int, n_ff_exp: int, n_expert: int, n_used: int, max_tokens: int) -> int:
        return sum(cls._sizes(n_embd, n_ff_exp, n_expert, n_used, max_tokens).values())

    @classmethod
    def allocate(
        cls, rt, n_embd: int, n_ff_exp: int, n_expert: int, n_used: int, max_tokens: int
    ) -> "MoeBuffers":
        bufs = {}
        for key, nbytes in cls._sizes(n_embd, n_ff_exp, n_expert, n_used, max_tokens).items():
            if key in ("ids", "bounds", "pair_token", "pair_slot"):
                # zeroed: with 0 tokens the grids still run one row, which then reads valid indices
                bufs[key] = rt.upload(np.zeros(nbytes // 4, np.int32), f"moe.{key}")
            else:
                bufs[key] = rt.alloc(nbytes, f"moe.{key}")
        return cls(n_embd, n_ff_exp, n_expert, n_used, max_tokens, **bufs)


def _per_pair(launches: list[Launch], n_used: int, max_pairs: int) -> list[Launch]:
    """A launch built for one row per token (global dim 1 = n_tokens rows, its row count a dyn arg), made to
    run one row per (token, k) pair: dim 1 grows by n_used per token and the kernel's row bound becomes the
    static max_pairs (the grid itself is exactly n_tokens * n_used rows, so no row past the pairs runs)."""
    out = []
    for launch in launches:
        for arg, _var in launch.dyn_args:
            launch.kernel.set_arg(arg, np.int32(max_pairs))
        assert launch.global_per_token[1] == 1 and (launch.local is None or launch.local[1] == 1), launch.name
        out.append(
            replace(
                launch,
                global_per_token=(launch.global_per_token[0], n_used),
                dyn_args=[],
                scale_var=VAR_N_TOKENS,
                name=f"moe_{launch.name}",
            )
        )
    return out


def _elementwise_launch(rt, name: str, args, n_embd: int, n_tokens_arg: int) -> Launch:
    k = rt.kernel(rt.build("moe.cl"), name)
    k.set_args(*args)
    items = -(-n_embd // 4)  # one float4 of the row each
    cols = -(-items // ELEM_LOCAL) * ELEM_LOCAL
    return Launch(
        k, (cols, 0), (0, 1), (ELEM_LOCAL, 1), [(n_tokens_arg, VAR_N_TOKENS)], VAR_N_TOKENS, name=name
    )


def moe_ffn(
    rt,
    mm,
    cur,
    x,
    gate_inp: DeviceWeight,
    gate_exps: DeviceWeight,
    up_exps: DeviceWeight | None,
    down_exps: DeviceWeight,
    n_expert: int,
    n_used: int,
    w_scale: float,
    buf: MoeBuffers,
    max_tokens: int,
    *,
    gating: str = "softmax",
    selection_bias=None,
    norm: bool = True,
    limit: float = 0.0,
) -> list[Launch]:
    """x[t] += sum_k w[t, k] * down_e(silu(gate_e(cur[t])) * up_e(cur[t])), e = the k-th routed expert of t.

    cur, x: float32 [max_tokens, n_embd] (cur is read only; x is the residual stream). gate_inp: a
    [n_expert, n_embd] weight (F32 in GGUF files) from upload_weight. gate_exps / up_exps: [n_ff_exp, n_embd]
    per expert, down_exps [n_embd, n_ff_exp] per expert, from upload_experts; up_exps None means gate_exps is
    a fused gate|up weight (2 n_ff_exp rows per expert, gate rows first: a file's ffn_gate_up_exps, one
    expert-indexed launch instead of two). w_scale: the model's
    expert_weights_scale (applied unless 0 or 1). gating "softmax" (qwen35moe: weights always normalized) or
    "sigmoid" (GLM-4.5: experts chosen by sigmoid + selection_bias float32 [n_expert], weights normalized
    when norm). limit > 0: step35's clamped SwiGLU (elementwise.swiglu_fused). Token count: the step variable
    VAR_N_TOKENS. The caller
    keeps buf, cur, x and the weights alive as long as the launches (a kernel argument does not hold its
    buffer).
    """
    n_embd, n_ff = buf.n_embd, buf.n_ff_exp
    if (buf.n_expert, buf.n_used) != (n_expert, n_used) or buf.max_tokens < max_tokens:
        raise ValueError(
            f"moe_ffn: buffers for n_expert={buf.n_expert}, n_used={buf.n_used}, max_tokens="
            f"{buf.max_tokens}; the layer needs {n_expert}, {n_used}, {max_tokens}"
        )
    fused = up_exps is None
    mats = [
        ("ffn_gate_up_exps" if fused else "ffn_gate_exps", gate_exps, 2 * n_ff if fused else n_ff, n_embd),
        ("ffn_up_exps", up_exps, n_ff, n_embd),
        ("ffn_down_exps", down_exps, n_embd, n_ff),
    ]
    for what, w, rows, cols in mats:
        if w is None:
            continue
        have = (getattr(w, "n_expert", None), w.n_rows, w.n_cols)
        if have != (n_expert, rows, cols):
            raise ValueError(
                f"moe_ffn: {what} is {list(have)} (n_expert from upload_experts), expected "
                f"[{n_expert}, {rows}, {cols}] for buffers of n_embd={n_embd}, n_ff_exp={n_ff}"
            )
    if gate_inp.n_rows != n_expert or gate_inp.n_cols != n_embd:
        raise ValueError(
            f"moe_ffn: ffn_gate_inp is [{gate_inp.n_rows}, {gate_inp.n_cols}], "
            f"expected [{n_expert}, {n_embd}]"
        )
    check_buffer(cur, 4 * max_tokens * n_embd, "moe_ffn cur")
    check_buffer(x, 4 * max_tokens * n_embd, "moe_ffn x")
    max_pairs = max_tokens * n_used
    prg = rt.build("moe.cl")
    launches = mm.matmul(gate_inp, cur, buf.logits, max_tokens)

    scale = 1.0 if w_scale in (0.0, 1.0) else float(w_scale)
    if gating == "softmax":
        route = rt.kernel(prg, "kernel_moe_route")
        route.set_args(
            buf.logits, buf.ids, buf.wts, np.int32(n_expert), np.int32(n_used), np.float32(scale), np.int32(0)
        )
        n_tokens_arg = 6
    elif gating == "sigmoid":
        if selection_bias is None:
            raise ValueError("moe_ffn: sigmoid gating needs the expert-selection bias (exp_probs_b)")
        check_buffer(selection_bias, 4 * n_expert, "moe_ffn selection_bias")
        route = rt.kernel(prg, "kernel_moe_route_sigmoid")
        route.set_args(buf.logits, selection_bias, buf.ids, buf.wts, np.int32(n_expert), np.int32(n_used),
                       np.float32(scale), np.int32(1 if norm else 0), np.int32(0))
        n_tokens_arg = 8
    else:
        raise ValueError(f"moe_ffn: gating {gating!r} (softmax or sigmoid)")
    launches.append(Launch(route, (0,), (1,), None, [(n_tokens_arg, VAR_N_TOKENS)], VAR_N_TOKENS,
                           name="ffn_moe_topk"))

    sort = rt.kernel(prg, "kernel_moe_sort")
    sort_wg = SORT_WG_CPU if mm.is_cpu else SORT_WG_GPU
    sort.set_args(
        buf.ids,
        buf.bounds,
        buf.pair_token,
        buf.pair_slot,
        cl.LocalMemory(4 * n_expert),
        np.int32(n_expert),
        np.int32(n_used),
        np.int32(0),
    )
    launches.append(
        Launch(sort, (sort_wg,), (0,), (sort_wg,), [(7, VAR_N_TOKENS)], VAR_N_TOKENS, name="ffn_moe_sort")
    )

    launches += _per_pair(
        gather_rows(rt, cur, buf.pair_token, buf.xg, n_embd, max_tokens, VAR_N_TOKENS), n_used, max_pairs
    )
    if fused:
        launches += mm.matmul_id(gate_exps, buf.xg, buf.gu, buf.bounds, max_tokens, max_pairs)
    else:
        launches += mm.matmul_id(
            gate_exps, buf.xg, buf.gu, buf.bounds, max_tokens, max_pairs, y_stride=2 * n_ff, y_offset=0
        )
        launches += mm.matmul_id(
            up_exps, buf.xg, buf.gu, buf.bounds, max_tokens, max_pairs, y_stride=2 * n_ff, y_offset=n_ff
        )
    launches += _per_pair(swiglu_fused(rt, buf.gu, buf.act, n_ff, limit), n_used, max_pairs)
    yd = buf.xg  # the gathered inputs are dead now
    launches += mm.matmul_id(down_exps, buf.act, yd, buf.bounds, max_tokens, max_pairs)

    combine = _elementwise_launch(
        rt,
        "kernel_moe_combine",
        (yd, buf.pair_slot, buf.wts, x, np.int32(n_embd), np.int32(n_used), np.int32(0)),
        n_embd,
        6,
    )
    combine.name = "ffn_moe_out"
    return launches + [combine]


def shared_expert_add(rt, y_sh, gate_logit, x, n_embd: int, max_tokens: int) -> list[Launch]:
    """x[t] += sigmoid(gate_logit[t]) * y_sh[t] for t < n_tokens: qwen35moe's shared expert, whose output
    y_sh float32 [max_tokens, n_embd] is gated per token by gate_logit float32 [max_tokens]
    (cur . ffn_gate_inp_shexp)."""
    if n_embd <= 0 or max_tokens <= 0:
        raise ValueError(f"shared_expert_add: n_embd={n_embd}, max_tokens={max_tokens}")
    check_buffer(y_sh, 4 * max_tokens * n_embd, "shared_expert_add y_sh")
    check_buffer(gate_logit, 4 * max_tokens, "shared_expert_add gate_logit")
    check_buffer(x, 4 * max_tokens * n_embd, "shared_expert_add x")
    launch = _elementwise_launch(
        rt, "kernel_moe_shared_add", (y_sh, gate_logit, x, np.int32(n_embd), np.int32(0)), n_embd, 4
    )
    launch.name = "ffn_shexp_gated"
    return [launch]
