"""Gated DeltaNet blocks (kernels/ssm_conv.cl, kernels/delta_net.cl) and their per-sequence state.

A linear-attention layer of qwen35 runs, for the tokens of a batch:
    ssm_conv        qkv_mixed [n_tokens, conv_dim] -> silu(conv) in place, conv state rolled
    gdn_prep        l2-norm q, k (q / sqrt(dk)) in place; g = ssm_a * softplus(alpha + dt_bias), beta = sigmoid(b)
    delta_net       gated delta rule -> o [n_tokens, n_v_heads * dv], delta state updated in place
    gated_rms_norm  rmsnorm(o) * ssm_norm * silu(z) per head
ssm_conv and delta_net read the sequence (slot) of each token from seqs (int32 [max_tokens], the batch's
per-token slot array, buf.seq): one launch handles every token of a batch that mixes sequences, as
continuous batching makes it. A sequence's tokens come in order of position, usually as one contiguous
run ([s2 s2 s2 s0 s5 s5]); a sequence may also come back in a later run, and the kernels still carry its
state in batch order. The kernels switch state where the sequence changes (the chunked form also cuts its
chunks there); a token whose slot is outside [0, n_seq) is skipped and writes nothing.

State per sequence: conv [kernel_size - 1, conv_dim] and delta [n_v_heads, dk, dv], float32.
`snapshot` / `restore` copy one sequence's states into a snapshot buffer and back on the device queue.
"""

import numpy as np
import pyopencl as cl

from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.ops.norm import check_buffer, work_group

# On a GPU, steps built for at most this many tokens use the recurrent kernel (decode, drafts), longer
# ones the chunked kernel (its k.S / q.S products are independent across a chunk's tokens, the
# recurrent form waits on S after every token). On a CPU "auto" picks the recurrent form with 16 value
# columns per work-item as float16 vectors (recurrent_v16) at every length: one layer at 8 heads of
# 128 x 128 took 0.21 -> 0.063 ms for 1 token and 51 -> 5.4 ms for 512 tokens against the one-column
# kernel, which PoCL does not vectorise; the chunked form is slower still there (a CPU core has no latency
# to hide and the chunked form adds the Gram matrices).
RECURRENT_MAX_TOKENS = 8


def conv_state_bytes(n_seq: int, channels: int, kernel_size: int) -> int:
    return 4 * n_seq * (kernel_size - 1) * channels


def delta_state_bytes(n_seq: int, n_v_heads: int, dk: int, dv: int) -> int:
    return 4 * n_seq * n_v_heads * dk * dv


def state_bytes(n_seq: int, channels: int, kernel_size: int, n_v_heads: int, dk: int, dv: int) -> int:
    """Conv + delta state of one linear-attention layer for n_seq sequences."""
    return conv_state_bytes(n_seq, channels, kernel_size) + delta_state_bytes(n_seq, n_v_heads, dk, dv)


def _check_heads(n_k_heads: int, n_v_heads: int, dk: int, dv: int) -> None:
    if n_k_heads <= 0 or n_v_heads % n_k_heads or dk <= 0 or dv <= 0:
        raise ValueError(f"delta_net: n_v_heads={n_v_heads} must be a multiple of n_k_heads={n_k_heads}, "
                         f"dk={dk}, dv={dv} positive")


def _defines(n_k_heads, n_v_heads, dk, dv, **extra) -> dict:
    return {"H_K": n_k_heads, "H_V": n_v_heads, "DK": dk, "DV": dv, **extra}


def _conv_vector_width(rt, channels: int) -> int:
    """Channels per ssm_conv work-item. PoCL does not vectorise across a work-item loop that wraps the token
    loop, so on a CPU the kernel's own vector type fills the SIMD lanes (512 tokens x 12288 channels on
    this machine's PoCL: 43 ms at 1, 5.5 ms at 16); a GPU wants the most work-items."""
    if not rt.device.type & cl.device_type.CPU:
        return 1
    return next(v for v in (16, 8, 4, 2, 1) if channels % v == 0)


def ssm_conv(rt, x, y, weight, state, seqs, channels: int, kernel_size: int, max_tokens: int) -> list[Launch]:
    """y[t, c] = silu(sum_i (state ++ x)[t + i, c] * weight[c, i]); state <- last kernel_size - 1 inputs.

    x, y: float32 [max_tokens, channels] (y may be x); weight: float32 [channels, kernel_size] (ssm_conv1d);
    state: float32 [n_seq, kernel_size - 1, channels]; seqs: int32 [max_tokens], the sequence of each token
    (each sequence's window rolls over its own tokens only; a token of a slot outside [0, n_seq) is skipped).
    """
    if kernel_size < 2 or channels <= 0:
        raise ValueError(f"ssm_conv: kernel_size={kernel_size}, channels={channels}")
    check_buffer(x, 4 * max_tokens * channels, "ssm_conv x")
    check_buffer(y, 4 * max_tokens * channels, "ssm_conv y")
    check_buffer(weight, 4 * channels * kernel_size, "ssm_conv weight")
    check_buffer(seqs, 4 * max_tokens, "ssm_conv seqs")
    n_seq = state.size // conv_state_bytes(1, channels, kernel_size)
    if n_seq < 1:
        raise ValueError(f"ssm_conv: state buffer of {state.size} bytes holds no sequence")
    vw = _conv_vector_width(rt, channels)
    kern = rt.kernel(rt.build("ssm_conv.cl", {"KS": kernel_size, "VW": vw}), "kernel_ssm_conv")
    kern.set_args(x, y, weight, state, seqs, np.int32(channels), np.int32(n_seq), np.int32(0))
    local = 64
    return [Launch(kern, (channels // vw,), (0,), (local,), [(7, VAR_N_TOKENS)], VAR_N_TOKENS, name="ssm_conv")]


def gdn_prep(rt, qkv, alpha, b, dt_bias, ssm_a, n_k_heads: int, n_v_heads: int, dk: int, dv: int,
             eps: float, max_tokens: int) -> list[Launch]:
    """In place: q, k rows of qkv l2-normalised (q also / sqrt(dk)); alpha <- g, b <- beta.

    qkv: float32 [max_tokens, 2 * n_k_heads * dk + n_v_heads * dv]; alpha, b: float32 [max_tokens,
    n_v_heads]; dt_bias, ssm_a: float32 [n_v_heads] (ssm_dt.bias, ssm_a = -exp(A_log)).
    """
    _check_heads(n_k_heads, n_v_heads, dk, dv)
    check_buffer(qkv, 4 * max_tokens * (2 * n_k_heads * dk + n_v_heads * dv), "gdn_prep qkv")
    check_buffer(alpha, 4 * max_tokens * n_v_heads, "gdn_prep alpha")
    check_buffer(b, 4 * max_tokens * n_v_heads, "gdn_prep b")
    check_buffer(dt_bias, 4 * n_v_heads, "gdn_prep dt_bias")
    check_buffer(ssm_a, 4 * n_v_heads, "gdn_prep ssm_a")
    wg = work_group(rt)
    kern = rt.kernel(rt.build("delta_net.cl", _defines(n_k_heads, n_v_heads, dk, dv, WG=wg)), "kernel_gdn_prep")
    kern.set_args(qkv, alpha, b, dt_bias, ssm_a, np.float32(eps))
    return [Launch(kern, (0,), (2 * n_k_heads * wg,), (wg,), [], VAR_N_TOKENS, name="gdn_prep")]


def chunk_size(rt, dk: int) -> int:
    """Largest chunk (64, 32, 16) whose k, q tiles and Gram matrices fit the device's local memory."""
    limit = int(rt.device.local_mem_size) - 256
    for ch in (64, 32, 16):
        if 4 * (2 * ch * dk + 2 * ch * ch + 2 * ch) <= limit:
            return ch
    raise ValueError(f"delta_net: head_k_dim={dk} does not fit a 16-token chunk in local memory")


def delta_net(rt, qkv, g, beta, state, out, seqs, n_k_heads: int, n_v_heads: int, dk: int, dv: int,
              max_tokens: int, *, form: str = "auto", chunk: int | None = None) -> list[Launch]:
    """Gated delta rule over the tokens of a batch, each on the state of its sequence seqs[t]; o -> out,
    states updated in place.

    qkv: float32 [max_tokens, 2 * n_k_heads * dk + n_v_heads * dv] as gdn_prep leaves it; g, beta:
    float32 [max_tokens, n_v_heads]; state: float32 [n_seq, n_v_heads, dk, dv]; out: float32
    [max_tokens, n_v_heads * dv]; seqs: int32 [max_tokens], the sequence of each token (a token of a slot
    outside [0, n_seq) is skipped: out row not written, no state touched). form: "recurrent",
    "recurrent_v16" (16 value columns per work-item; dv % 16 == 0), "chunked", or "auto" (on a CPU
    recurrent_v16 when dv allows, else recurrent; on a GPU recurrent when the step is built for at most
    RECURRENT_MAX_TOKENS tokens, else chunked). All forms give the same result within float error.
    """
    _check_heads(n_k_heads, n_v_heads, dk, dv)
    check_buffer(qkv, 4 * max_tokens * (2 * n_k_heads * dk + n_v_heads * dv), "delta_net qkv")
    check_buffer(g, 4 * max_tokens * n_v_heads, "delta_net g")
    check_buffer(beta, 4 * max_tokens * n_v_heads, "delta_net beta")
    check_buffer(out, 4 * max_tokens * n_v_heads * dv, "delta_net out")
    check_buffer(seqs, 4 * max_tokens, "delta_net seqs")
    n_seq = state.size // delta_state_bytes(1, n_v_heads, dk, dv)
    if n_seq < 1:
        raise ValueError(f"delta_net: state buffer of {state.size} bytes holds no sequence")
    if form == "auto":
        cpu = bool(rt.device.type & cl.device_type.CPU)
        if cpu:
            form = "recurrent_v16" if dv % 16 == 0 else "recurrent"
        else:
            form = "recurrent" if max_tokens <= RECURRENT_MAX_TOKENS else "chunked"
    if form == "recurrent_v16":
        if dv % 16:
            raise ValueError(f"delta_net: recurrent_v16 needs head_v_dim % 16 == 0, not {dv}")
        prg = rt.build("delta_net.cl", _defines(n_k_heads, n_v_heads, dk, dv))
        kern = rt.kernel(prg, "kernel_gdn_recurrent_v16")
        local = (1, 1)
        kern.set_args(qkv, g, beta, state, out, seqs, np.int32(n_seq), np.int32(0))
        return [Launch(kern, (dv // 16, n_v_heads), (0, 0), local, [(7, VAR_N_TOKENS)], VAR_N_TOKENS,
                       name="delta_net_recurrent_v16")]
    if form == "recurrent":
        # one work-item per value column; up to 64 columns per group
        lr = min(dv, 64)
        while dv % lr:
            lr //= 2
        prg = rt.build("delta_net.cl", _defines(n_k_heads, n_v_heads, dk, dv))
        kern = rt.kernel(prg, "kernel_gdn_recurrent")
        local = (lr, 1)
    elif form == "chunked":
        if dv > int(rt.device.max_work_group_size):
            raise ValueError(f"delta_net: head_v_dim={dv} exceeds the device's work-group size")
        ch = chunk or chunk_size(rt, dk)
        prg = rt.build("delta_net.cl", _defines(n_k_heads, n_v_heads, dk, dv, CH=ch))
        kern = rt.kernel(prg, "kernel_gdn_chunked")
        local = (dv, 1)
    else:
        raise ValueError(f"delta_net: form={form!r} is not 'auto', 'recurrent', 'recurrent_v16' or 'chunked'")
    kern.set_args(qkv, g, beta, state, out, seqs, np.int32(n_seq), np.int32(0))
    return [Launch(kern, (dv, n_v_heads), (0, 0), local, [(7, VAR_N_TOKENS)], VAR_N_TOKENS,
                   name=f"delta_net_{form}")]


def gated_rms_norm(rt, x, z, weight, y, n_v_heads: int, dv: int, eps: float, max_tokens: int) -> list[Launch]:
    """y = rmsnorm(x) * weight * silu(z) per head row of dv floats; x, z, y float32 [max_tokens, n_v_heads * dv]."""
    for buf, what in ((x, "x"), (z, "z"), (y, "y")):
        check_buffer(buf, 4 * max_tokens * n_v_heads * dv, f"gated_rms_norm {what}")
    check_buffer(weight, 4 * dv, "gated_rms_norm weight")
    wg = work_group(rt)
    # H_K / H_V / DK only size QKV_DIM, unused here; one program per head size
    kern = rt.kernel(rt.build("delta_net.cl", _defines(1, 1, dv, dv, WG=wg)), "kernel_gated_rms_norm")
    kern.set_args(x, z, weight, y, np.float32(eps))
    return [Launch(kern, (0,), (n_v_heads * wg,), (wg,), [], VAR_N_TOKENS, name="attn_norm_gated")]


def seq_layout(buffers_and_seq_bytes, seq: int) -> list[tuple[object, int, int]]:
    """(buffer, byte offset of seq, bytes) for each (state buffer, bytes per sequence)."""
    out = []
    for buf, per_seq in buffers_and_seq_bytes:
        if (seq + 1) * per_seq > buf.size or seq < 0:
            raise ValueError(f"state snapshot: sequence {seq} is outside a buffer of {buf.size} bytes")
        out.append((buf, seq * per_seq, per_seq))
    return out


def snapshot_bytes(buffers_and_seq_bytes) -> int:
    return sum(per_seq for _, per_seq in buffers_and_seq_bytes)


def snapshot(rt, buffers_and_seq_bytes, seq: int, snap) -> None:
    """Copy sequence seq's slice of every state buffer (conv and delta of each layer) into snap, packed
    in order; device-side copies on the queue, so they follow the launches already enqueued."""
    check_buffer(snap, snapshot_bytes(buffers_and_seq_bytes), "state snapshot")
    off = 0
    for buf, src_off, n in seq_layout(buffers_and_seq_bytes, seq):
        cl.enqueue_copy(rt.queue, snap, buf, byte_count=n, src_offset=src_off, dst_offset=off)
        off += n


def restore(rt, buffers_and_seq_bytes, seq: int, snap) -> None:
    """The inverse of snapshot: write snap back into sequence seq's slices."""
    check_buffer(snap, snapshot_bytes(buffers_and_seq_bytes), "state snapshot")
    off = 0
    for buf, dst_off, n in seq_layout(buffers_and_seq_bytes, seq):
        cl.enqueue_copy(rt.queue, buf, snap, byte_count=n, src_offset=off, dst_offset=dst_off)
        off += n
