"""Fused attention-input preparation (kernels/qkv_prep.cl): q/k norm + RoPE + KV store in one launch, and
SwiGLU over a fused gate|up projection.

Decode on PoCL is dominated by per-launch dispatch once the mat-vecs run near bandwidth; projecting
Q|K|V and gate|up with one mat-vec each (row-concatenated weights) and preparing q/k/v in one kernel
takes a layer from 16 launches to 9.
"""

import math

import numpy as np

from nextn.cl.launch import VAR_N_TOKENS, Launch
from nextn.ops.attention import kv_defines, ring_defines

QKV_WG = 8  # heads per work-group of kernel_qkv_prep (see its header)


def _program(rt, n_head, n_head_kv, head_dim, n_rot, neox, qk_norm, q_gate, freq_factors=False,
             mrope_sections=None, k_type="f16", v_type="f16", ring=None):
    defines = {"HD": head_dim, "N_HEAD": n_head, "N_HEAD_KV": n_head_kv, "N_ROT": n_rot, "NEOX": int(neox),
               "QK_NORM": int(qk_norm)}
    if q_gate:
        defines["Q_GATE"] = 1
    if freq_factors:
        defines["FREQ_FACTORS"] = 1
    if mrope_sections is not None:
        defines.update(zip(("MROPE_T", "MROPE_H", "MROPE_W", "MROPE_E"), mrope_sections))
    defines.update(kv_defines(k_type, v_type))
    if ring is not None:
        defines["KV_RING"] = ring
    return rt.build("qkv_prep.cl", defines)


def qkv_prep(rt, qkv, q_out, k_cache, v_cache, positions, seqs, q_norm, k_norm, *, n_head: int,
             n_head_kv: int, head_dim: int, n_rot: int, neox: bool, freq_base: float, freq_scale: float,
             eps: float, n_ctx: int, n_seq: int, q_gate: bool = False, freq_factors=None,
             mrope_sections: tuple[int, int, int, int] | None = None, k_type: str = "f16",
             v_type: str = "f16", rows: int | None = None) -> list[Launch]:
    """qkv float32 [n_tokens, (n_head + 2 n_head_kv) * head_dim] -> q_out [n_tokens, n_head * head_dim] and
    the K/V caches [n_seq, n_head_kv, n_ctx, head_dim]. q_norm/k_norm: float32 [head_dim] or None.
    q_gate: each Q head in qkv is followed by head_dim gate values (qwen35; ops/attention.py applies the gate). freq_factors:
    float32 [n_rot / 2] dividing each pair's angle (Llama 3.1's rope_freqs), or None. mrope_sections:
    qwen35's interleaved M-RoPE sections when pairs fall on the fourth one (those do not turn at text
    positions), else None. k_type / v_type: the caches' row types (ops/attention.py KV_TYPES). rows: the
    caches' rows per sequence when they are a sliding-window ring (ops/attention.py ring_rows)."""
    if n_rot % 2 or n_rot > head_dim:
        raise ValueError(f"qkv_prep: n_rot={n_rot} must be even and <= head_dim={head_dim}")
    qk_norm = q_norm is not None
    prg = _program(rt, n_head, n_head_kv, head_dim, n_rot, neox, qk_norm, q_gate, freq_factors is not None,
                   mrope_sections, k_type, v_type, ring_defines(n_ctx, rows).get("KV_RING"))
    k = rt.kernel(prg, "kernel_qkv_prep")
    dummy = q_out  # any buffer: the norm weights (factors) are not read without QK_NORM (FREQ_FACTORS)
    k.set_args(qkv, q_out, k_cache, v_cache, positions, seqs, q_norm if qk_norm else dummy,
               k_norm if qk_norm else dummy, dummy if freq_factors is None else freq_factors, np.float32(eps),
               np.float32(freq_scale), np.float32(-2.0 * math.log2(freq_base) / n_rot), np.int32(n_ctx),
               np.int32(n_seq), np.int32(0))
    return [Launch(k, (n_head + 2 * n_head_kv, 0), (0, 1), (QKV_WG, 1), [(14, VAR_N_TOKENS)], VAR_N_TOKENS,
                   name="qkv_prep")]
