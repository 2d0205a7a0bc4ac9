"""Varlen flash attention in Triton: the ``"triton"`` backend of
:func:`mugv_kernels.varlen_attention`.

FlashAttention-2 (Dao 2023, arXiv 2307.08691, Algorithms 1 and 2) over packed segments
(``cu_seqlens``), non-causal, forward and backward, written for MUG-V's head_dim 72:
instead of padding D to the next power of two (128, what FlexAttention's kernels do),
the head dim is split into a power-of-two part and a small remainder (72 = 64 + 16, of
which 8 are padding), so the matmuls run 80 lanes for 72 useful (90%) instead of 128
(56%).

Layout (top to bottom): Triton kernels, launch helpers, the registered ops
``mugv::varlen_attn_fwd`` / ``mugv::varlen_attn_bwd`` with their autograd, the public
function, the AOT cases. The reference is :mod:`mugv_kernels.reference.varlen_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mugv_kernels._align import common_divisor, multiple
from mugv_kernels._registry import INTERPRET, is_capturing, launch, mugv_op, register_aot_cases, use_triton
from mugv_kernels._validate import last_dim_contiguous
from mugv_kernels.reference.varlen_attention import varlen_attention_bwd_ref, varlen_attention_fwd_ref

__all__ = ["attn_launch_config", "head_dim_split", "varlen_flash_attention"]

_LOG2E = 1.4426950408889634
MAX_SEGMENTS = 65535
"""Largest segment count B (it is the grid's second axis, limited to 65535 by CUDA)."""


# ----------------------------------------------------------------------------------------
# Kernels
#
# One program per (block of BLOCK_M queries | keys, segment b, head h). Segment base
# pointers are computed in int64 from cu_seqlens[b]; offsets inside a block are int32
# (BLOCK x token stride). Tiles move through block pointers over the segment's [rows, D]
# slab, bounds-checked against the segment length and D with zero fill (fewer live
# pointer registers than pointer tiles: a 128 x 64 forward tile fits at D = 72 without
# spills). Scores in the log2 domain, s2 = (q . k) * scale * log2(e).
# Forward (online softmax, FA2 Alg. 1), over the key blocks of segment b:
#   m' = max(m, rowmax(s2));  p = exp2(s2 - m');  l = l * exp2(m - m') + rowsum(p)
#   acc = acc * exp2(m - m') + p @ v;             out = acc / l,  lse = (m + log2 l) * ln 2
# A segment without keys runs no iteration: l = 0, out = 0, lse = +inf.
# Backward (FA2 Alg. 2, dK/dV and dQ in two kernels, no atomics):
#   p = exp2(s2 - lse * log2(e));  dp = do @ v^T;  ds = p * (dp - delta),
#   delta = rowsum(do * out);  dv = p^T @ do;  dk = scale * ds^T @ q;  dq = scale * ds @ k
# head_dim D is covered by two column blocks [0, BLOCK_D1) and [BLOCK_D1, BLOCK_D1 +
# BLOCK_D2) (the second only when SPLIT_D): every dot is the sum of the two parts, every
# D-wide tile is two tiles. Columns >= D load as 0 and are never stored.
# UPCAST (the interpreter only) converts tiles to fp32 after loading; compiled kernels
# feed fp16/bf16 tiles to the tensor cores and accumulate in fp32.
# DIV (a power of two <= 16, from the launcher) divides D and every stride: the kernels
# tell the compiler so (multiple), which makes a D = 72 tile row (144 bytes, 16-byte
# aligned at every head and token) load and store in 128-bit accesses (mugv_kernels._align).
# ----------------------------------------------------------------------------------------


@triton.jit
def _load_block(ptr, UPCAST: tl.constexpr):
    """A bounds-checked block-pointer tile (zero outside the segment and past D)."""
    x = tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_block(ptr, x, OUT_TY: tl.constexpr):
    """Store ``x`` converted to ``OUT_TY`` through a bounds-checked block pointer."""
    tl.store(ptr, x.to(OUT_TY), boundary_check=(0, 1))


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, CU_Q, CU_K, OUT, LSE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_q, D, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    SPLIT_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    D = multiple(D, DIV)
    stride_qt, stride_qh = multiple(stride_qt, DIV), multiple(stride_qh, DIV)
    stride_kt, stride_kh = multiple(stride_kt, DIV), multiple(stride_kh, DIV)
    stride_vt, stride_vh = multiple(stride_vt, DIV), multiple(stride_vh, DIV)
    stride_ot, stride_oh = multiple(stride_ot, DIV), multiple(stride_oh, DIV)
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start = tl.load(CU_Q + b).to(tl.int64)
    q_len = tl.load(CU_Q + b + 1).to(tl.int64) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(CU_K + b).to(tl.int64)
    k_len = tl.load(CU_K + b + 1).to(tl.int64) - k_start
    Qs = Q + h * stride_qh + q_start * stride_qt
    Ks = K + h * stride_kh + k_start * stride_kt
    Vs = V + h * stride_vh + k_start * stride_vt
    m0 = pid_m * BLOCK_M
    q1 = tl.load(tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (m0, 0), (BLOCK_M, BLOCK_D1), (1, 0)),
                 boundary_check=(0, 1), padding_option="zero")  # fmt: skip
    k1_ptr = tl.make_block_ptr(Ks, (D, k_len), (1, stride_kt), (0, 0), (BLOCK_D1, BLOCK_N), (0, 1))  # K^T
    v1_ptr = tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (0, 0), (BLOCK_N, BLOCK_D1), (1, 0))
    if UPCAST:
        q1 = q1.to(tl.float32)
    if SPLIT_D:
        q2 = tl.load(tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (m0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0)),
                     boundary_check=(0, 1), padding_option="zero")  # fmt: skip
        k2_ptr = tl.make_block_ptr(Ks, (D, k_len), (1, stride_kt), (BLOCK_D1, 0), (BLOCK_D2, BLOCK_N), (0, 1))
        v2_ptr = tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0))
        if UPCAST:
            q2 = q2.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        k1_t = tl.load(k1_ptr, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            k1_t = k1_t.to(tl.float32)
        s = tl.dot(q1, k1_t, input_precision=DOT_PRECISION)
        if SPLIT_D:
            k2_t = tl.load(k2_ptr, boundary_check=(0, 1), padding_option="zero")
            if UPCAST:
                k2_t = k2_t.to(tl.float32)
            s += tl.dot(q2, k2_t, input_precision=DOT_PRECISION)
        s = tl.where((start_n + offs_n)[None, :] < k_len, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v1 = tl.load(v1_ptr, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:
            v1 = v1.to(tl.float32)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PRECISION)
        if SPLIT_D:
            v2 = tl.load(v2_ptr, boundary_check=(0, 1), padding_option="zero")
            if UPCAST:
                v2 = v2.to(tl.float32)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=DOT_PRECISION)
            k2_ptr = tl.advance(k2_ptr, (0, BLOCK_N))
            v2_ptr = tl.advance(v2_ptr, (BLOCK_N, 0))
        m_i = m_new
        k1_ptr = tl.advance(k1_ptr, (0, BLOCK_N))
        v1_ptr = tl.advance(v1_ptr, (BLOCK_N, 0))
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    Os = OUT + h * stride_oh + q_start * stride_ot
    o1_ptr = tl.make_block_ptr(Os, (q_len, D), (stride_ot, 1), (m0, 0), (BLOCK_M, BLOCK_D1), (1, 0))
    tl.store(o1_ptr, (acc1 / l_safe[:, None]).to(OUT.dtype.element_ty), boundary_check=(0, 1))
    if SPLIT_D:
        o2_ptr = tl.make_block_ptr(Os, (q_len, D), (stride_ot, 1), (m0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0))
        tl.store(o2_ptr, (acc2 / l_safe[:, None]).to(OUT.dtype.element_ty), boundary_check=(0, 1))
    offs_m = m0 + tl.arange(0, BLOCK_M)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + h * total_q + q_start + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _varlen_attn_bwd_delta_kernel(
    OUT, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    """``delta[h, t] = sum_d dout[t, h, d] * out[t, h, d]`` in fp32 (FA2 Alg. 2, line 4)."""
    D = multiple(D, DIV)
    stride_ot, stride_oh = multiple(stride_ot, DIV), multiple(stride_oh, DIV)
    stride_dot, stride_doh = multiple(stride_dot, DIV), multiple(stride_doh, DIV)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (cols[None, :] < D)
    o = tl.load(OUT + h * stride_oh + rows[:, None] * stride_ot + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO + h * stride_doh + rows[:, None] * stride_dot + cols[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + h * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, DK, DV,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_q, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    SPLIT_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    D = multiple(D, DIV)
    stride_qt, stride_qh = multiple(stride_qt, DIV), multiple(stride_qh, DIV)
    stride_kt, stride_kh = multiple(stride_kt, DIV), multiple(stride_kh, DIV)
    stride_vt, stride_vh = multiple(stride_vt, DIV), multiple(stride_vh, DIV)
    stride_dot, stride_doh = multiple(stride_dot, DIV), multiple(stride_doh, DIV)
    stride_dkt, stride_dkh = multiple(stride_dkt, DIV), multiple(stride_dkh, DIV)
    stride_dvt, stride_dvh = multiple(stride_dvt, DIV), multiple(stride_dvh, DIV)
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    k_start = tl.load(CU_K + b).to(tl.int64)
    k_len = tl.load(CU_K + b + 1).to(tl.int64) - k_start
    if pid_n * BLOCK_N >= k_len:
        return
    q_start = tl.load(CU_Q + b).to(tl.int64)
    q_len = tl.load(CU_Q + b + 1).to(tl.int64) - q_start
    n0 = pid_n * BLOCK_N
    Ks = K + h * stride_kh + k_start * stride_kt
    Vs = V + h * stride_vh + k_start * stride_vt
    Qs = Q + h * stride_qh + q_start * stride_qt
    DOs = DO + h * stride_doh + q_start * stride_dot
    k1 = _load_block(tl.make_block_ptr(Ks, (k_len, D), (stride_kt, 1), (n0, 0), (BLOCK_N, BLOCK_D1), (1, 0)), UPCAST)
    v1 = _load_block(tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (n0, 0), (BLOCK_N, BLOCK_D1), (1, 0)), UPCAST)
    q1_ptr = tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (0, 0), (BLOCK_M, BLOCK_D1), (1, 0))
    do1_ptr = tl.make_block_ptr(DOs, (q_len, D), (stride_dot, 1), (0, 0), (BLOCK_M, BLOCK_D1), (1, 0))
    if SPLIT_D:
        k2 = _load_block(
            tl.make_block_ptr(Ks, (k_len, D), (stride_kt, 1), (n0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0)), UPCAST
        )
        v2 = _load_block(
            tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (n0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0)), UPCAST
        )
        q2_ptr = tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0))
        do2_ptr = tl.make_block_ptr(DOs, (q_len, D), (stride_dot, 1), (0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0))
    dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    Ls = LSE + h * total_q + q_start
    Ds = DELTA + h * total_q + q_start
    for start_m in range(0, q_len, BLOCK_M):
        q1 = _load_block(q1_ptr, UPCAST)
        do1 = _load_block(do1_ptr, UPCAST)
        s_t = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(v1, tl.trans(do1), input_precision=DOT_PRECISION)
        if SPLIT_D:
            q2 = _load_block(q2_ptr, UPCAST)
            do2 = _load_block(do2_ptr, UPCAST)
            s_t += tl.dot(k2, tl.trans(q2), input_precision=DOT_PRECISION)
            dp_t += tl.dot(v2, tl.trans(do2), input_precision=DOT_PRECISION)
        m_mask = (start_m + offs_m) < q_len
        lse = tl.load(Ls + start_m + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(Ds + start_m + offs_m, mask=m_mask, other=0.0)
        p_t = tl.where(m_mask[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dv1 += tl.dot(p_t.to(do1.dtype), do1, input_precision=DOT_PRECISION)
        dk1 += tl.dot(ds_t.to(q1.dtype), q1, input_precision=DOT_PRECISION)
        if SPLIT_D:
            dv2 += tl.dot(p_t.to(do2.dtype), do2, input_precision=DOT_PRECISION)
            dk2 += tl.dot(ds_t.to(q2.dtype), q2, input_precision=DOT_PRECISION)
            q2_ptr = tl.advance(q2_ptr, (BLOCK_M, 0))
            do2_ptr = tl.advance(do2_ptr, (BLOCK_M, 0))
        q1_ptr = tl.advance(q1_ptr, (BLOCK_M, 0))
        do1_ptr = tl.advance(do1_ptr, (BLOCK_M, 0))
    DKs = DK + h * stride_dkh + k_start * stride_dkt
    DVs = DV + h * stride_dvh + k_start * stride_dvt
    _store_block(
        tl.make_block_ptr(DKs, (k_len, D), (stride_dkt, 1), (n0, 0), (BLOCK_N, BLOCK_D1), (1, 0)),
        dk1 * sm_scale,
        DK.dtype.element_ty,
    )
    _store_block(
        tl.make_block_ptr(DVs, (k_len, D), (stride_dvt, 1), (n0, 0), (BLOCK_N, BLOCK_D1), (1, 0)),
        dv1,
        DV.dtype.element_ty,
    )
    if SPLIT_D:
        _store_block(
            tl.make_block_ptr(DKs, (k_len, D), (stride_dkt, 1), (n0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0)),
            dk2 * sm_scale,
            DK.dtype.element_ty,
        )
        _store_block(
            tl.make_block_ptr(DVs, (k_len, D), (stride_dvt, 1), (n0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0)),
            dv2,
            DV.dtype.element_ty,
        )


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_q, D, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    SPLIT_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    D = multiple(D, DIV)
    stride_qt, stride_qh = multiple(stride_qt, DIV), multiple(stride_qh, DIV)
    stride_kt, stride_kh = multiple(stride_kt, DIV), multiple(stride_kh, DIV)
    stride_vt, stride_vh = multiple(stride_vt, DIV), multiple(stride_vh, DIV)
    stride_dot, stride_doh = multiple(stride_dot, DIV), multiple(stride_doh, DIV)
    stride_dqt, stride_dqh = multiple(stride_dqt, DIV), multiple(stride_dqh, DIV)
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start = tl.load(CU_Q + b).to(tl.int64)
    q_len = tl.load(CU_Q + b + 1).to(tl.int64) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(CU_K + b).to(tl.int64)
    k_len = tl.load(CU_K + b + 1).to(tl.int64) - k_start
    m0 = pid_m * BLOCK_M
    Qs = Q + h * stride_qh + q_start * stride_qt
    DOs = DO + h * stride_doh + q_start * stride_dot
    Ks = K + h * stride_kh + k_start * stride_kt
    Vs = V + h * stride_vh + k_start * stride_vt
    q1 = _load_block(tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (m0, 0), (BLOCK_M, BLOCK_D1), (1, 0)), UPCAST)
    do1 = _load_block(tl.make_block_ptr(DOs, (q_len, D), (stride_dot, 1), (m0, 0), (BLOCK_M, BLOCK_D1), (1, 0)), UPCAST)
    k1_ptr = tl.make_block_ptr(Ks, (k_len, D), (stride_kt, 1), (0, 0), (BLOCK_N, BLOCK_D1), (1, 0))
    v1_ptr = tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (0, 0), (BLOCK_N, BLOCK_D1), (1, 0))
    if SPLIT_D:
        q2 = _load_block(
            tl.make_block_ptr(Qs, (q_len, D), (stride_qt, 1), (m0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0)), UPCAST
        )
        do2 = _load_block(
            tl.make_block_ptr(DOs, (q_len, D), (stride_dot, 1), (m0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0)), UPCAST
        )
        k2_ptr = tl.make_block_ptr(Ks, (k_len, D), (stride_kt, 1), (0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0))
        v2_ptr = tl.make_block_ptr(Vs, (k_len, D), (stride_vt, 1), (0, BLOCK_D1), (BLOCK_N, BLOCK_D2), (1, 0))
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    lse = tl.load(LSE + h * total_q + q_start + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * total_q + q_start + offs_m, mask=m_mask, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        k1 = _load_block(k1_ptr, UPCAST)
        v1 = _load_block(v1_ptr, UPCAST)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        dp = tl.dot(do1, tl.trans(v1), input_precision=DOT_PRECISION)
        if SPLIT_D:
            k2 = _load_block(k2_ptr, UPCAST)
            v2 = _load_block(v2_ptr, UPCAST)
            s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
            dp += tl.dot(do2, tl.trans(v2), input_precision=DOT_PRECISION)
        p = tl.where((start_n + offs_n)[None, :] < k_len, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=DOT_PRECISION)
        if SPLIT_D:
            dq2 += tl.dot(ds.to(k2.dtype), k2, input_precision=DOT_PRECISION)
            k2_ptr = tl.advance(k2_ptr, (BLOCK_N, 0))
            v2_ptr = tl.advance(v2_ptr, (BLOCK_N, 0))
        k1_ptr = tl.advance(k1_ptr, (BLOCK_N, 0))
        v1_ptr = tl.advance(v1_ptr, (BLOCK_N, 0))
    DQs = DQ + h * stride_dqh + q_start * stride_dqt
    _store_block(
        tl.make_block_ptr(DQs, (q_len, D), (stride_dqt, 1), (m0, 0), (BLOCK_M, BLOCK_D1), (1, 0)),
        dq1 * sm_scale,
        DQ.dtype.element_ty,
    )
    if SPLIT_D:
        _store_block(
            tl.make_block_ptr(DQs, (q_len, D), (stride_dqt, 1), (m0, BLOCK_D1), (BLOCK_M, BLOCK_D2), (1, 0)),
            dq2 * sm_scale,
            DQ.dtype.element_ty,
        )


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


def _d_blocks(D: int) -> dict:
    """The head-dim constexprs of the kernels (see :func:`head_dim_split`)."""
    d1, d2, split = head_dim_split(D)
    return dict(BLOCK_D1=d1, BLOCK_D2=d2, SPLIT_D=split)


def head_dim_split(D: int) -> tuple[int, int, bool]:
    """``(BLOCK_D1, BLOCK_D2, SPLIT_D)``: the column blocks covering head_dim D.

    Power-of-two blocks of at least 16 (``tl.dot``'s minimum). A D that is not a power of
    two is split into its largest power of two below and the remainder's block when that
    covers fewer lanes than the next power of two: 72 -> 64 + 16 (80 lanes, not 128),
    96 -> 64 + 32, 40 -> 32 + 16; 120 -> 128 (64 + 64 saves nothing).
    """
    full = max(triton.next_power_of_2(D), 16)
    if D <= 16 or full == D:
        return full, 16, False
    d1 = full // 2
    d2 = max(triton.next_power_of_2(D - d1), 16)
    if d1 + d2 >= full:
        return full, 16, False
    return d1, d2, True


@dataclass(frozen=True)
class AttnLaunchConfig:
    """Tile sizes and warps of one kernel (no autotuning: one explicit choice)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attn_launch_config(kernel: str, D: int, device: torch.device) -> AttnLaunchConfig:
    """Tiles for ``kernel`` in ``("fwd", "dkdv", "dq")`` (``block_m`` query rows x
    ``block_n`` key rows per step).

    CUDA: the largest tiles that compile for sm_90a without register spills at the
    benchmark shapes (``python -m mugv_kernels.aot --family varlen_attention``), by the
    lanes the head dim occupies (80 for D = 72): forward 128 x 64 up to 80 lanes, 128 x 32
    up to 128, 64 x 32 beyond (8 warps, 2 stages); dK/dV 32 x 128 (2 stages) up to 80
    lanes, 16 x 64 up to 128; dQ 128 x 32 (2 stages) up to 128 lanes; 16 x 32 beyond.
    Every dQ tile up to 128 lanes has 128 query rows: with 8 warps (two warpgroups of 64
    rows) its dots lower to Hopper's ``wgmma`` (a 32-row tile would use ``mma.sync``). The
    interpreter: 32 x 32 tiles (each program costs Python time; tests cross a tile
    boundary with segments longer than 32).
    """
    if device.type != "cuda" and not is_capturing():
        return AttnLaunchConfig(32, 32, 4, 1)
    d1, d2, split = head_dim_split(D)
    lanes = d1 + (d2 if split else 0)
    if kernel == "fwd":
        if lanes <= 80:
            return AttnLaunchConfig(128, 64, 8, 2)
        return AttnLaunchConfig(128, 32, 8, 2) if lanes <= 128 else AttnLaunchConfig(64, 32, 8, 2)
    if lanes > 128:
        return AttnLaunchConfig(16, 32, 8, 1)
    if kernel == "dkdv":  # block_n keys stay in registers while block_m query rows stream by
        return AttnLaunchConfig(32, 128, 8, 2) if lanes <= 80 else AttnLaunchConfig(16, 64, 8, 1)
    return AttnLaunchConfig(128, 32, 8, 2)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"), not TF32; fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _varlen_attn_fwd_launch(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    Tq, H, D = q.shape
    B = cu_q.shape[0] - 1
    out = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, Tq), dtype=torch.float32, device=q.device)
    cfg = attn_launch_config("fwd", D, q.device)
    grid = (triton.cdiv(max_q, cfg.block_m), B, H)
    if min(grid) == 0 or Tq == 0:
        return out, lse
    launch(_varlen_attn_fwd_kernel, grid)(
        q, k, v, cu_q, cu_k, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        Tq, D, float(scale) * _LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **_d_blocks(D),
        DIV=common_divisor(D, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2]),
        UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def _varlen_attn_bwd_launch(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    Tq, H, D = q.shape
    B = cu_q.shape[0] - 1
    dq = torch.empty((Tq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # delta = rowsum(dout * out) in fp32, [H, Tq] like lse: one memory-bound pass
    delta = torch.empty((H, Tq), dtype=torch.float32, device=q.device)
    if Tq > 0:
        launch(_varlen_attn_bwd_delta_kernel, (triton.cdiv(Tq, 32), H))(
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), Tq, D,
            BLOCK_T=32, BLOCK_D=max(triton.next_power_of_2(D), 16),
            DIV=common_divisor(D, *out.stride()[:2], *dout.stride()[:2]), num_warps=4, num_stages=1,
        )  # fmt: skip
    strides_in = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1)
    )  # fmt: skip
    div = common_divisor(D, *strides_in, *dq.stride()[:2], *dk.stride()[:2], *dv.stride()[:2])
    common = dict(**_d_blocks(D), UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(q.dtype), DIV=div)
    cfg = attn_launch_config("dkdv", D, q.device)
    grid = (triton.cdiv(max_k, cfg.block_n), B, H)
    if min(grid) > 0 and k.shape[0] > 0:
        launch(_varlen_attn_bwd_dkdv_kernel, grid)(
            q, k, v, dout, lse, delta, cu_q, cu_k, dk, dv,
            *strides_in, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            Tq, D, float(scale) * _LOG2E, float(scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    cfg = attn_launch_config("dq", D, q.device)
    grid = (triton.cdiv(max_q, cfg.block_m), B, H)
    if min(grid) > 0 and Tq > 0:
        launch(_varlen_attn_bwd_dq_kernel, grid)(
            q, k, v, dout, lse, delta, cu_q, cu_k, dq,
            *strides_in, dq.stride(0), dq.stride(1),
            Tq, D, float(scale) * _LOG2E, float(scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------


def _varlen_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    Tq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((H, Tq), dtype=torch.float32)


@mugv_op("varlen_attn_fwd", fake=_varlen_attn_fwd_fake)
def _varlen_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``mugv::varlen_attn_fwd``: ``(out [Tq, H, D], lse [H, Tq] fp32, natural log)``."""
    if use_triton(q):
        return _varlen_attn_fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    out, lse = varlen_attention_fwd_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    return out.contiguous(), lse


def _varlen_attn_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    def like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(q), like(k), like(v)


@mugv_op("varlen_attn_bwd", fake=_varlen_attn_bwd_fake)
def _varlen_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``mugv::varlen_attn_bwd``: ``(dq, dk, dv)`` in the inputs' shapes and dtypes."""
    if use_triton(q):
        return _varlen_attn_bwd_launch(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale
        )
    dq, dk, dv = varlen_attention_bwd_ref(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _varlen_attn_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _varlen_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.mugv.varlen_attn_bwd(
        dout=last_dim_contiguous(dout), q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=ctx.max_q, max_seqlen_k=ctx.max_k, scale=ctx.scale,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None


_varlen_attn_fwd.register_autograd(_varlen_attn_backward, setup_context=_varlen_attn_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def varlen_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
) -> Tensor:
    """Packed attention with the Triton FlashAttention-2 kernels (forward and backward).

    The ``"triton"`` backend of :func:`mugv_kernels.varlen_attention`, which validates
    the arguments; call that. Math: FlashAttention-2 (arXiv 2307.08691, Alg. 1 and 2),
    non-causal, per packed segment; see the kernels' comment.

    Args:
        q: ``[Tq, H, D]``; k, v: ``[Tk, H, D]``: fp16/bf16/fp32 CUDA tensors (or CPU
            under ``TRITON_INTERPRET=1``; fp64 runs the reference); unit stride on D.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32/int64 offsets, B <= 65535.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest segments (grid size).
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``[Tq, H, D]`` in ``q.dtype``, contiguous; zero rows for segments without keys.

    Raises:
        ValueError: more than 65535 segments.
    """
    if cu_seqlens_q.shape[0] - 1 > MAX_SEGMENTS:
        raise ValueError(f"the triton backend handles at most {MAX_SEGMENTS} segments, got {cu_seqlens_q.shape[0] - 1}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return torch.ops.mugv.varlen_attn_fwd(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k), scale=scale,
    )[0]  # fmt: skip


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile cases: the launches the ops make at the benchmark shapes
# ----------------------------------------------------------------------------------------


@register_aot_cases("varlen_attention")
def _aot_cases() -> None:
    """The benchmark shapes: four clips (36002, 18002, 9002, 4502 tokens), 48 heads,
    head_dim 72 (MUG-V 10B), bf16, forward and backward; plus head_dim 128 and 64."""
    lengths = [36002, 18002, 9002, 4502]
    T, B = sum(lengths), len(lengths)
    cu = torch.empty(B + 1, device="meta", dtype=torch.int32)
    for H, D in ((48, 72), (16, 128), (16, 64)):
        q, k, v = (torch.empty(T, H, D, device="meta", dtype=torch.bfloat16) for _ in range(3))
        out, lse = _varlen_attn_fwd_launch(q, k, v, cu, cu, max(lengths), max(lengths), D**-0.5)
        _varlen_attn_bwd_launch(torch.empty_like(out), q, k, v, out, lse, cu, cu, max(lengths), max(lengths), D**-0.5)
