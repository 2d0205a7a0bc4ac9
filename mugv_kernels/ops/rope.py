"""QK-RMSNorm + 3D RoPE family: per-head RMSNorm of Q and K and a 3D rotary embedding, fused.

Before every self-attention MUG-V (arXiv 2510.17519; public code ``mug_v/dit/module.py``,
``Attention.forward``: ``q_norm``/``k_norm`` then ``apply_rotary_emb`` with the table of
``MUGDiT.get_freq_cis``) normalizes each head of Q and K over ``head_dim`` and rotates it
by a 3D RoPE whose three sections follow the (h, w, t) position of the token. The public
code runs this in fp32 through complex numbers over a materialized ``[B, N, 36]`` complex
table: several full passes over Q and K. Here one kernel reads Q and K once, computes the
angles from the integer positions in registers and writes both outputs; the backward
recomputes the RMS statistics from Q and K (no saved activations beyond the inputs) and
reduces the norm-weight gradients through deterministic per-program fp32 partials.

Math (reference: :mod:`mugv_kernels.reference.rope`), for one head row ``x [D]``::

    xn        = x * rstd * w,   rstd = rsqrt(mean(x**2) + eps)       (fp32; skipped without w)
    y[e]      = xn[e] * cos(a_e) + sgn_e * xn[p(e)] * sin(a_e)
    a_e       = pos[col(e)] * theta ** (-2 j(e) / sections[col(e)])

where ``p(e)`` is the element ``e`` is paired with (``e ^ 1`` interleaved, ``e +- d/2``
rotate-half; ``e`` itself past ``sum(sections)``), ``sgn`` is -1 for the first element of
a pair and +1 for the second. Backward (the rotation is orthogonal: its transpose turns
by ``-a``)::

    dxn[e] = dy[e] * cos(a_e) - sgn_e * dy[p(e)] * sin(a_e)
    dw    += dxn * xhat                     xhat = x * rstd
    dx     = rstd * (dxn * w - xhat * mean(dxn * w * xhat))

``across_heads`` (Wan's ``rms_norm_across_heads``): the mean runs over all ``H * D`` values
of a token and ``w`` is ``[H * D]``. The forward first sweeps the token's head blocks for
the statistic, then runs the tile loop (the second read of the token's rows, 10 KB at
40 x 128 bf16, is meant to hit L1/L2); the backward sweeps tokens x heads for each
token's ``rstd`` and ``mean(dxn * w * xhat)`` (a ``[tokens, 2]`` fp32 scratch), then
heads x tokens for ``dx`` with the head block's weight gradient in registers. Both use
the same 2-warp, 8-lanes-per-thread tiles as the per-head norm.

Non-power-of-two head dims (MUG-V: D = 72). A program holds ``[BLOCK_T, BLOCK_H,
BLOCK_D]`` tiles of tokens x heads x dims with ``BLOCK_D = next_power_of_2(D)`` (128 for
D = 72) and masks the lanes ``e >= D``. Masked lanes issue no memory requests, so HBM
traffic is exactly the useful bytes; what they cost is issue slots and registers: at
D = 72, 56 of 128 lanes (44%) do no useful arithmetic. That is affordable because the
kernel does a few FLOPs per byte (memory-bound) and cos/sin are computed once per token
(shared by all heads of q and k), not per element; the tile is kept small (one token x
4 heads on a GPU, :func:`launch_config`) so registers stay low and several programs stay
resident per SM; the forward loads the next head block of q and k before finishing the
current one (two blocks of loads in flight per thread), the backward issues all loads of
a step (dy and x of q and k) before its math, to keep enough HBM requests in flight.
The launcher passes ``DIV``, the power of two dividing D and the strides (8 at D = 72;
:mod:`mugv_kernels._align`), so each thread's 8 lanes of a head row are a 16-byte run
the compiler moves in one 128-bit access. The partner element ``x[p(e)]`` comes from
the loaded tile, never from a second load: in the interleaved layout the pairs
``(2i, 2i + 1)`` are swapped in registers (``tl.reshape`` to ``[..., BLOCK_D / 2, 2]``,
``tl.split``, ``tl.join``); in the half-split layout (partner half a section away, 21 or
22 elements for Wan's (44, 42, 42), not in the thread's 16-byte run) ``tl.gather`` along
the head dim exchanges the 16-bit values between the threads of the row (any section
split). The same holds for the norm weights, and in the backward for ``dy``. Angles are ``fp32(pos) * fp32(inv_freq)`` as in the
public table; cos/sin use :func:`_cos_sin` (no libdevice slow path).

Layout (top to bottom): Triton kernels, launch helpers, the registered ops
``mugv::qk_norm_rope3d_fwd`` / ``mugv::qk_norm_rope3d_bwd`` with their autograd, the
public functions, the AOT cases.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mugv_kernels._align import common_divisor, multiple
from mugv_kernels._registry import KERNEL_BACKENDS, check_backend, launch, mugv_op, register_aot_cases, use_triton
from mugv_kernels._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, last_dim_contiguous
from mugv_kernels.reference.rope import qk_norm_rope3d_ref, rope3d_bwd_ref, rope3d_fwd_ref

__all__ = ["BACKENDS", "MAX_D", "MAX_POSITION", "qk_norm_rope3d", "rope3d", "video_positions"]

BACKENDS = KERNEL_BACKENDS  # the backend= values of qk_norm_rope3d and rope3d

MAX_D = 1024
"""Largest head dimension (one head row of ``next_power_of_2(D)`` lanes per tile row)."""

MAX_POSITION = 1 << 24
"""Positions must lie in ``[0, 2**24)``: the kernel converts them to fp32 exactly."""


# ----------------------------------------------------------------------------------------
# Kernels
#
# A program works on [BLOCK_T, BLOCK_H, BLOCK_D] tiles: BLOCK_T tokens x BLOCK_H heads x
# the (padded) head dim. The per-element tables (partner, sign, frequency, position
# column) are built once per program, cos/sin once per token block ([BLOCK_T, BLOCK_D],
# shared by every head of q and of k), then the head blocks of q and k are normalized and
# rotated. All token offsets are int64.
# Forward: one program per block of BLOCK_T tokens.
# Backward: a grid of programs, each looping over a contiguous chunk of token blocks,
# keeping the norm-weight gradient in a tile-shaped fp32 accumulator; each program stores
# its own [D] partial (one writer per slot), summed on the host in a fixed order:
# deterministic.
# ----------------------------------------------------------------------------------------


@triton.jit
def _rope_tables(e, neg_log2_theta, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per element ``e`` of a head: ``(partner, sign, inv_freq, column)`` (see module doc)."""
    in0 = e < S0
    in1 = (e >= S0) & (e < S0 + S1)
    rot = e < S0 + S1 + S2
    off = tl.where(in0, 0, tl.where(in1, S0, S0 + S1))
    size = tl.where(in0, S0, tl.where(in1, S1, S2))
    size = tl.where(rot, size, 2)  # a safe divisor for pass-through and padding lanes
    local = e - off
    if INTERLEAVED:
        first = (local % 2) == 0
        j = local // 2
        partner = tl.where(first, e + 1, e - 1)
    else:
        half = size // 2
        first = local < half
        j = tl.where(first, local, local - half)
        partner = tl.where(first, e + half, e - half)
    partner = tl.where(rot, partner, e)
    sign = tl.where(rot, tl.where(first, -1.0, 1.0), 0.0)
    # theta ** (-2j / d) = exp2(-(2j / d) * log2(theta)); scalars may arrive as fp64 from
    # Inductor: back to fp32 before the exp2
    exponent = (2 * j).to(tl.float32) / size.to(tl.float32)
    inv_freq = tl.where(rot, tl.exp2((exponent * neg_log2_theta).to(tl.float32)), 0.0)
    column = tl.where(in0, 0, tl.where(in1, 1, 2))
    return partner, sign, inv_freq, column


@triton.jit
def _cos_sin(a):
    """``(cos(a), sin(a))`` in fp32 without libdevice: Cody-Waite reduction by pi/2 (three
    constants; exact quadrant products for ``|a| < 2**15 * pi/2``) and the Cephes ``sinf``/
    ``cosf`` minimax polynomials on ``[-pi/4, pi/4]`` (max error 8e-8 against fp64 over
    ``[0, 600]``). libdevice's ``sinf`` carries a Payne-Hanek slow path for huge arguments
    that spills registers; fp32 angles past ~1e5 rad are already off by more than the
    reduction error, as in any fp32 table."""
    k = tl.floor(a * 0.6366197723675814 + 0.5)
    r = a - k * 1.5703125
    r = r - k * 4.837512969970703125e-4
    r = r - k * 7.549789948768648e-8
    quadrant = k.to(tl.int32) & 3
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return cos, sin


@triton.jit
def _token_block(t0, t_end, N, BLOCK_T: tl.constexpr):
    """Flat token indices ``t0 + [0, BLOCK_T)`` (int64, also where ``t0`` is a Python int under
    the interpreter), their mask ``< t_end`` and their (batch, position) ``[BLOCK_T]``."""
    toks = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
    tmask = toks < t_end
    b = toks // N
    return toks, tmask, b, toks - b * N


@triton.jit
def _tokens_cos_sin(POS, b, n, tmask, stride_pb, stride_pn, stride_pc, column, inv_freq, sign):
    """``cos(a)`` and ``sign * sin(a)`` of a token block's angles, ``[BLOCK_T, 1, BLOCK_D]``."""
    p = POS + b * stride_pb + n * stride_pn
    p0 = tl.load(p, mask=tmask, other=0).to(tl.float32)[:, None]
    p1 = tl.load(p + stride_pc, mask=tmask, other=0).to(tl.float32)[:, None]
    p2 = tl.load(p + 2 * stride_pc, mask=tmask, other=0).to(tl.float32)[:, None]
    col = column[None, :]
    pos = tl.where(col == 0, p0, tl.where(col == 1, p1, p2))
    cos, sin = _cos_sin(pos * inv_freq[None, :])
    return cos[:, None, :], (sign[None, :] * sin)[:, None, :]


@triton.jit
def _tile_offsets(row_base, heads, stride_h, e3):
    """Element offsets ``[BLOCK_T, BLOCK_H, BLOCK_D]`` of a tile (int64 rows)."""
    return row_base[:, None, None] + heads.to(tl.int64)[None, :, None] * stride_h + e3


@triton.jit
def _swap_pairs(x):
    """``x`` with the elements of each pair ``(2i, 2i + 1)`` of its last axis swapped: the
    rotation partners of the interleaved layout, from registers (no second load)."""
    a, b = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2]))
    return tl.reshape(tl.join(b, a), [x.shape[0], x.shape[1], x.shape[2]])


@triton.jit
def _partners(x, p3, INTERLEAVED: tl.constexpr):
    """The pair partners ``x[p(e)]`` of a loaded tile ``x [*, *, BLOCK_D]`` (any dtype),
    from registers (no second load): the pairs swapped for the interleaved layout, else
    gathered along the head dim at the partner indices ``p3 [1, 1, BLOCK_D]`` (any
    section split: half a section away for the half-split layout; warp shuffles and a
    shared-memory exchange, moved in the tile's 16-bit storage dtype)."""
    if INTERLEAVED:
        xp = _swap_pairs(x)
    else:
        xp = tl.gather(x, tl.broadcast_to(p3, x.shape), 2)
    return xp


@triton.jit
def _load_tile(X, x_rows, stride_xh, heads, e3, mask):
    """A ``[BLOCK_T, BLOCK_H, BLOCK_D]`` tile in ``X``'s dtype: callers take its
    partners (:func:`_partners`) before converting both to fp32 for any arithmetic."""
    return tl.load(X + _tile_offsets(x_rows, heads, stride_xh, e3), mask=mask, other=0.0)


@triton.jit
def _head_weights(W, heads, H, D, e3):
    """An across-heads weight ``[H * D]`` as a ``[1, BLOCK_H, BLOCK_D]`` tile of the head
    block, in ``W``'s dtype."""
    wmask = (heads < H)[None, :, None] & (e3 < D)
    return tl.load(W + heads.to(tl.int64)[None, :, None] * D + e3, mask=wmask, other=0.0)


@triton.jit
def _rows_rstd(X, x_rows, stride_xh, tmask3, e3, H, D, eps, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """``rsqrt(mean(x**2) + eps)`` of each token over all heads (``H * D`` values),
    ``[BLOCK_T, 1, 1]`` fp32: a sweep of loads before the tile loop (its second read of
    the same rows is an L1/L2 hit)."""
    hs = tl.arange(0, BLOCK_H)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + hs
        m = tmask3 & (heads < H)[None, :, None]
        v = tl.load(X + _tile_offsets(x_rows, heads, stride_xh, e3), mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(tl.sum(v * v, axis=2), axis=1)
    return (1.0 / tl.sqrt(ss / (H * D) + eps)).to(tl.float32)[:, None, None]


@triton.jit
def _rope_fwd_finish(
    x, OUT, out_rows, heads, e3, p3, mask, cos, ssin, w, wp, D, eps, rstd,
    HAS_W: tl.constexpr, ACROSS_HEADS: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """Norm + rotate a loaded tile (storage dtype) and store it; ``w``/``wp``: the norm
    weight and its partners (fp32), ``rstd``: the across-heads statistic, used when
    ``ACROSS_HEADS``. ``rstd`` is per row, so the partner of the normalized element is
    ``x[p(e)] * rstd * w[p(e)]``."""
    xp = _partners(x, p3, INTERLEAVED).to(tl.float32)
    x = x.to(tl.float32)
    if HAS_W:
        if not ACROSS_HEADS:
            rstd = (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps)).to(tl.float32)[:, :, None]
        x = x * rstd * w
        xp = xp * rstd * wp
    y = x * cos + xp * ssin
    tl.store(OUT + _tile_offsets(out_rows, heads, D, e3), y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope3d_fwd_kernel(
    Q, K, POS, QW, KW, QO, KO,
    N, H, D, n_tokens,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_pb, stride_pn, stride_pc,
    eps, neg_log2_theta,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_K: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ACROSS_HEADS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    D = multiple(D, DIV)
    stride_qb, stride_qn, stride_qh = multiple(stride_qb, DIV), multiple(stride_qn, DIV), multiple(stride_qh, DIV)
    stride_kb, stride_kn, stride_kh = multiple(stride_kb, DIV), multiple(stride_kn, DIV), multiple(stride_kh, DIV)
    toks, tmask, b, n = _token_block(tl.program_id(0).to(tl.int64) * BLOCK_T, n_tokens, N, BLOCK_T)
    e = tl.arange(0, BLOCK_D)
    emask = e < D
    partner, sign, inv_freq, column = _rope_tables(e, neg_log2_theta, S0, S1, S2, INTERLEAVED)
    e3 = e[None, None, :]
    p3 = partner[None, None, :]
    q_rows = b * stride_qb + n * stride_qn
    k_rows = b * stride_kb + n * stride_kn
    out_rows = toks * H * D
    hs = tl.arange(0, BLOCK_H)
    tmask3 = tmask[:, None, None] & emask[None, None, :]
    rstd_q = tl.zeros([BLOCK_T, 1, 1], dtype=tl.float32)
    rstd_k = rstd_q
    if ACROSS_HEADS:  # RMSNorm over all heads (Wan): the statistics first
        if HAS_QW:
            rstd_q = _rows_rstd(Q, q_rows, stride_qh, tmask3, e3, H, D, eps, BLOCK_T, BLOCK_H)
        if HAS_KW:
            rstd_k = _rows_rstd(K, k_rows, stride_kh, tmask3, e3, H, D, eps, BLOCK_T, BLOCK_H)
    # issue the first head block's loads before the position math and weights
    heads = hs
    mask = tmask3 & (heads < H)[None, :, None]
    xq = _load_tile(Q, q_rows, stride_qh, heads, e3, mask)
    xk = xq
    if HAS_K:
        xk = _load_tile(K, k_rows, stride_kh, heads, e3, mask)
    cos, ssin = _tokens_cos_sin(POS, b, n, tmask, stride_pb, stride_pn, stride_pc, column, inv_freq, sign)
    qw = tl.zeros([1, 1, BLOCK_D], dtype=tl.float32)
    qwp = qw
    kw = qw
    kwp = qw
    if HAS_QW and not ACROSS_HEADS:
        qw = tl.load(QW + e3, mask=e3 < D, other=0.0)
        qwp = _partners(qw, p3, INTERLEAVED).to(tl.float32)
        qw = qw.to(tl.float32)
    if HAS_KW and not ACROSS_HEADS:
        kw = tl.load(KW + e3, mask=e3 < D, other=0.0)
        kwp = _partners(kw, p3, INTERLEAVED).to(tl.float32)
        kw = kw.to(tl.float32)
    # software pipeline over head blocks: load block i + 1 (q and k) before finishing
    # block i, so two blocks of loads are in flight; the last prefetch is fully masked
    for h0 in range(BLOCK_H, H + BLOCK_H, BLOCK_H):
        next_heads = h0 + hs
        next_mask = tmask3 & (next_heads < H)[None, :, None]
        nq = _load_tile(Q, q_rows, stride_qh, next_heads, e3, next_mask)
        nk = nq
        if HAS_K:
            nk = _load_tile(K, k_rows, stride_kh, next_heads, e3, next_mask)
        qw_h, qwp_h, kw_h, kwp_h = qw, qwp, kw, kwp
        if ACROSS_HEADS:  # the weight is [H * D]: this head block's slice (not loop-carried)
            if HAS_QW:
                qw_h = _head_weights(QW, heads, H, D, e3)
                qwp_h = _partners(qw_h, p3, INTERLEAVED).to(tl.float32)
                qw_h = qw_h.to(tl.float32)
            if HAS_KW:
                kw_h = _head_weights(KW, heads, H, D, e3)
                kwp_h = _partners(kw_h, p3, INTERLEAVED).to(tl.float32)
                kw_h = kw_h.to(tl.float32)
        _rope_fwd_finish(
            xq, QO, out_rows, heads, e3, p3, mask, cos, ssin, qw_h, qwp_h, D, eps, rstd_q, HAS_QW, ACROSS_HEADS,
            INTERLEAVED,
        )  # fmt: skip
        if HAS_K:
            _rope_fwd_finish(
                xk, KO, out_rows, heads, e3, p3, mask, cos, ssin, kw_h, kwp_h, D, eps, rstd_k, HAS_KW, ACROSS_HEADS,
                INTERLEAVED,
            )  # fmt: skip
        xq, xk = nq, nk
        heads, mask = next_heads, next_mask


@triton.jit
def _rope_bwd_rotate(dy, p3, cos, ssin, INTERLEAVED: tl.constexpr):
    """``dxn = dy * cos - dy[p(e)] * sign * sin``, the rotation by ``-a``. A pair shares
    its angle and has opposite signs, so ``-dy[p(e)] * ssin[e] = (dy * ssin)[p(e)]``:
    one partner exchange of ``dy * ssin`` in registers."""
    return dy.to(tl.float32) * cos - _partners(dy, p3, INTERLEAVED).to(tl.float32) * ssin


@triton.jit
def _rope_bwd_finish(
    dy, x, DX, out_rows, heads, e3, p3, mask, cos, ssin, w, D, eps, acc_w, HAS_W: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """Gradient of one loaded ``[BLOCK_T, BLOCK_H, BLOCK_D]`` tile, stored; returns the
    updated weight accumulator."""
    dxn = _rope_bwd_rotate(dy, p3, cos, ssin, INTERLEAVED)
    x = x.to(tl.float32)
    if HAS_W:
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps)).to(tl.float32)[:, :, None]
        xhat = x * rstd
        acc_w += dxn * xhat
        dxhat = dxn * w
        c = (tl.sum(dxhat * xhat, axis=2) / D)[:, :, None]
        dx = (dxhat - xhat * c) * rstd
    else:
        dx = dxn
    tl.store(DX + _tile_offsets(out_rows, heads, D, e3), dx.to(DX.dtype.element_ty), mask=mask)
    return acc_w


@triton.jit
def _rope_bwd_across_heads(
    DY, X, W, DX, DW_P, STATS, pid, t_start, t_end, N, H, D,
    stride_dyb, stride_dyn, stride_dyh, stride_xb, stride_xn, stride_xh,
    POS, stride_pb, stride_pn, stride_pc, column, inv_freq, sign, e, e3, p3, eps,
    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward of one tensor whose RMSNorm runs over all heads (``C = H * D``), for the
    program's tokens ``[t_start, t_end)``. Sweep 1 (tokens, then heads) reduces each
    token's ``rstd`` and ``m = mean(dxhat * xhat)`` over all C values into ``STATS
    [n_tokens, 2]`` (fp32 scratch); sweep 2 (heads outer, tokens inner) writes
    ``dx = rstd * (dxn * w - xhat * m)`` and keeps the head block's weight gradient in a
    tile-shaped fp32 accumulator, stored as this program's ``[C]`` partial (one writer per
    slot: deterministic)."""
    hs = tl.arange(0, BLOCK_H)
    emask = e < D
    C = H * D
    for t0 in range(t_start, t_end, BLOCK_T):
        toks, tmask, b, n = _token_block(t0, t_end, N, BLOCK_T)
        cos, ssin = _tokens_cos_sin(POS, b, n, tmask, stride_pb, stride_pn, stride_pc, column, inv_freq, sign)
        dy_rows = b * stride_dyb + n * stride_dyn
        x_rows = b * stride_xb + n * stride_xn
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        sd = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            heads = h0 + hs
            mask = tmask[:, None, None] & (heads < H)[None, :, None] & emask[None, None, :]
            dy = _load_tile(DY, dy_rows, stride_dyh, heads, e3, mask)
            x = tl.load(X + _tile_offsets(x_rows, heads, stride_xh, e3), mask=mask, other=0.0).to(tl.float32)
            w = _head_weights(W, heads, H, D, e3).to(tl.float32)
            dxn = _rope_bwd_rotate(dy, p3, cos, ssin, INTERLEAVED)
            ss += tl.sum(tl.sum(x * x, axis=2), axis=1)
            sd += tl.sum(tl.sum(dxn * w * x, axis=2), axis=1)
        rstd = 1.0 / tl.sqrt(ss / C + eps)
        tl.store(STATS + toks * 2, rstd, mask=tmask)
        tl.store(STATS + toks * 2 + 1, sd * rstd / C, mask=tmask)
    tl.debug_barrier()  # sweep 2 reads what other threads of this program stored
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + hs
        w = _head_weights(W, heads, H, D, e3).to(tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_T):
            toks, tmask, b, n = _token_block(t0, t_end, N, BLOCK_T)
            cos, ssin = _tokens_cos_sin(POS, b, n, tmask, stride_pb, stride_pn, stride_pc, column, inv_freq, sign)
            mask = tmask[:, None, None] & (heads < H)[None, :, None] & emask[None, None, :]
            dy = _load_tile(DY, b * stride_dyb + n * stride_dyn, stride_dyh, heads, e3, mask)
            x_offs = _tile_offsets(b * stride_xb + n * stride_xn, heads, stride_xh, e3)
            x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(STATS + toks * 2, mask=tmask, other=0.0)[:, None, None]
            m = tl.load(STATS + toks * 2 + 1, mask=tmask, other=0.0)[:, None, None]
            dxn = _rope_bwd_rotate(dy, p3, cos, ssin, INTERLEAVED)
            xhat = x * rstd
            acc += dxn * xhat
            dx = (dxn * w - xhat * m) * rstd
            tl.store(DX + _tile_offsets(toks * H * D, heads, D, e3), dx.to(DX.dtype.element_ty), mask=mask)
        wmask = (heads < H)[:, None] & emask[None, :]
        tl.store(DW_P + pid * C + heads.to(tl.int64)[:, None] * D + e[None, :], tl.sum(acc, axis=0), mask=wmask)


@triton.jit
def _rope3d_bwd_kernel(
    DQO, DKO, Q, K, POS, QW, KW, DQ, DK, DQW_P, DKW_P, QS, KS,
    N, H, D, n_tokens, tokens_per_program,
    stride_dqb, stride_dqn, stride_dqh, stride_dkb, stride_dkn, stride_dkh,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_pb, stride_pn, stride_pc,
    eps, neg_log2_theta,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, INTERLEAVED: tl.constexpr,
    HAS_K: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ACROSS_HEADS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    D = multiple(D, DIV)
    stride_dqb, stride_dqn = multiple(stride_dqb, DIV), multiple(stride_dqn, DIV)
    stride_dkb, stride_dkn = multiple(stride_dkb, DIV), multiple(stride_dkn, DIV)
    stride_qb, stride_qn = multiple(stride_qb, DIV), multiple(stride_qn, DIV)
    stride_kb, stride_kn = multiple(stride_kb, DIV), multiple(stride_kn, DIV)
    stride_dqh, stride_dkh = multiple(stride_dqh, DIV), multiple(stride_dkh, DIV)
    stride_qh, stride_kh = multiple(stride_qh, DIV), multiple(stride_kh, DIV)
    pid = tl.program_id(0).to(tl.int64)
    t_start = pid * tokens_per_program  # a multiple of BLOCK_T
    t_end = tl.minimum(t_start + tokens_per_program, n_tokens)
    e = tl.arange(0, BLOCK_D)
    emask = e < D
    partner, sign, inv_freq, column = _rope_tables(e, neg_log2_theta, S0, S1, S2, INTERLEAVED)
    e3 = e[None, None, :]
    p3 = partner[None, None, :]
    if ACROSS_HEADS:  # RMSNorm over all heads (Wan); the launcher passes both weights
        _rope_bwd_across_heads(
            DQO, Q, QW, DQ, DQW_P, QS, pid, t_start, t_end, N, H, D,
            stride_dqb, stride_dqn, stride_dqh, stride_qb, stride_qn, stride_qh,
            POS, stride_pb, stride_pn, stride_pc, column, inv_freq, sign, e, e3, p3, eps, INTERLEAVED, BLOCK_T, BLOCK_H,
            BLOCK_D,
        )  # fmt: skip
        if HAS_K:
            _rope_bwd_across_heads(
                DKO, K, KW, DK, DKW_P, KS, pid, t_start, t_end, N, H, D,
                stride_dkb, stride_dkn, stride_dkh, stride_kb, stride_kn, stride_kh,
                POS, stride_pb, stride_pn, stride_pc, column, inv_freq, sign, e, e3, p3, eps, INTERLEAVED,
                BLOCK_T, BLOCK_H, BLOCK_D,
            )  # fmt: skip
    else:
        qw = tl.zeros([1, 1, BLOCK_D], dtype=tl.float32)
        kw = qw
        if HAS_QW:
            qw = tl.load(QW + e3, mask=e3 < D, other=0.0).to(tl.float32)
        if HAS_KW:
            kw = tl.load(KW + e3, mask=e3 < D, other=0.0).to(tl.float32)
        hs = tl.arange(0, BLOCK_H)
        acc_q = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
        acc_k = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=tl.float32)
        for t0 in range(t_start, t_end, BLOCK_T):
            toks, tmask, b, n = _token_block(t0, t_end, N, BLOCK_T)
            cos, ssin = _tokens_cos_sin(POS, b, n, tmask, stride_pb, stride_pn, stride_pc, column, inv_freq, sign)
            dq_rows = b * stride_dqb + n * stride_dqn
            dk_rows = b * stride_dkb + n * stride_dkn
            q_rows = b * stride_qb + n * stride_qn
            k_rows = b * stride_kb + n * stride_kn
            out_rows = toks * H * D
            for h0 in range(0, H, BLOCK_H):
                heads = h0 + hs
                mask = tmask[:, None, None] & (heads < H)[None, :, None] & emask[None, None, :]
                # every load of the step (q and k) is issued before the math
                dyq = _load_tile(DQO, dq_rows, stride_dqh, heads, e3, mask)
                xq = dyq
                if HAS_QW:
                    xq = _load_tile(Q, q_rows, stride_qh, heads, e3, mask)
                dyk, xk = dyq, xq
                if HAS_K:
                    dyk = _load_tile(DKO, dk_rows, stride_dkh, heads, e3, mask)
                    if HAS_KW:
                        xk = _load_tile(K, k_rows, stride_kh, heads, e3, mask)
                acc_q = _rope_bwd_finish(
                    dyq, xq, DQ, out_rows, heads, e3, p3, mask, cos, ssin, qw, D, eps, acc_q, HAS_QW, INTERLEAVED
                )
                if HAS_K:
                    acc_k = _rope_bwd_finish(
                        dyk, xk, DK, out_rows, heads, e3, p3, mask, cos, ssin, kw, D, eps, acc_k, HAS_KW, INTERLEAVED
                    )
        if HAS_QW:
            tl.store(DQW_P + pid * D + e, tl.sum(tl.sum(acc_q, axis=0), axis=0), mask=emask)
        if HAS_KW:
            tl.store(DKW_P + pid * D + e, tl.sum(tl.sum(acc_k, axis=0), axis=0), mask=emask)


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Tile of ``block_t`` tokens x ``block_h`` heads x ``block_d`` dims (``block_d >= D``,
    a power of two)."""

    block_t: int
    block_h: int
    block_d: int
    num_warps: int
    num_stages: int = 1


def launch_config(H: int, D: int, device: torch.device) -> LaunchConfig:
    """``BLOCK_D = next_power_of_2(D)``; on a GPU one token and ``512 // BLOCK_D`` heads
    per tile over ``BLOCK_H * BLOCK_D / 256`` warps (2 warps at D = 72 and 128): 8 lanes
    per thread, so each thread holds a 16-byte run of a head row (128-bit accesses), in
    either pair layout and with either norm (pair partners come from registers).

    Small tiles keep registers low (``python -m mugv_kernels.aot --family rope --report``
    at the MUG-V shape); without the forward's one-block prefetch, 1024-lane tiles
    needed 121 / 151 registers and 2048-lane tiles spilled in the backward. Triton's CPU interpreter
    pays per operation, not per lane, so there a tile takes 16 tokens (same math, fewer
    interpreted steps); heads stay in blocks of at most 4 so the head loop and its masks
    run in the tests.
    """
    block_d = max(triton.next_power_of_2(D), 16)
    if device.type == "cpu":
        return LaunchConfig(16, min(triton.next_power_of_2(max(H, 1)), 4), block_d, 4)
    block_h = max(1, min(triton.next_power_of_2(max(H, 1)), 512 // block_d))
    num_warps = max(1, block_h * block_d // 256)
    return LaunchConfig(block_t=1, block_h=block_h, block_d=block_d, num_warps=num_warps)


def bwd_programs(n_tokens: int, block_t: int, device: torch.device) -> tuple[int, int]:
    """``(n_programs, tokens_per_program)`` of the backward grid (a multiple of
    ``block_t`` tokens each): ~8 programs per SM on CUDA, each looping over its tokens;
    one per 32 tokens elsewhere."""
    if n_tokens == 0:
        return 0, block_t
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = triton.cdiv(n_tokens, 32)
    per_program = triton.cdiv(triton.cdiv(n_tokens, min(target, n_tokens)), block_t) * block_t
    return triton.cdiv(n_tokens, per_program), per_program


def _as_bnhd(t: Tensor) -> Tensor:
    """``[total, H, D]`` as a ``[1, total, H, D]`` view (padded layouts are unchanged)."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _pos_strides(positions: Tensor, x4: Tensor) -> tuple[int, int, int]:
    """Strides ``(b, n, column)`` of positions for ``x4 [B, N, H, D]`` (b-stride 0 when shared)."""
    if positions.dim() == 2:
        return 0, positions.stride(0), positions.stride(1)
    sb = positions.stride(0) if positions.shape[0] == x4.shape[0] and x4.shape[0] > 1 else 0
    return sb, positions.stride(1), positions.stride(2)


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bwd_register_cap(cfg: LaunchConfig, interleaved: bool, normed: bool) -> dict:
    """ptxas register cap of the backward (``maxnreg``), read from ``python -m
    mugv_kernels.aot --family rope --report``: 128 (16 warps per SM) for 2-warp tiles,
    which left alone keep the fused D = 128 interleaved backward at 96 registers and spill
    8 bytes, and the plain half-split one at 80 with an 8-byte spill; none for the fused
    half-split backward, which fits 119 registers alone and spills under any cap."""
    if cfg.num_warps != 2 or (normed and not interleaved):
        return {}
    return {"maxnreg": 128}


def _rope3d_fwd_launch(q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False):
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else q.new_empty(0)
    q4 = _as_bnhd(q)
    B, N, H, D = q4.shape
    if q4.numel() == 0:
        return q_out, k_out
    k4 = _as_bnhd(k) if k is not None else q4
    across = bool(across_heads) and q_weight is not None
    cfg = launch_config(H, D, q.device)
    S0, S1, S2 = (int(s) for s in sections)
    launch(_rope3d_fwd_kernel, (triton.cdiv(B * N, cfg.block_t),))(
        q4, k4, positions, q_weight if q_weight is not None else q4, k_weight if k_weight is not None else q4,
        q_out, k_out if k is not None else q_out,
        N, H, D, B * N,
        *_strides3(q4), *_strides3(k4), *_pos_strides(positions, q4),
        float(eps), -math.log2(theta),
        S0=S0, S1=S1, S2=S2, INTERLEAVED=bool(interleaved),
        HAS_K=k is not None, HAS_QW=q_weight is not None, HAS_KW=k is not None and k_weight is not None,
        ACROSS_HEADS=across,
        BLOCK_T=cfg.block_t, BLOCK_H=cfg.block_h, BLOCK_D=cfg.block_d,
        DIV=common_divisor(D, *_strides3(q4), *_strides3(k4)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return q_out, k_out


def _rope3d_bwd_launch(
    dq_out, dk_out, q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False
):
    dev = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev) if k is not None else q.new_empty(0)
    q4 = _as_bnhd(q)
    B, N, H, D = q4.shape
    n_tokens = B * N
    has_k = k is not None
    has_kw = has_k and k_weight is not None
    if q4.numel() == 0:
        dqw = torch.zeros_like(q_weight) if q_weight is not None else q.new_empty(0)
        dkw = torch.zeros_like(k_weight) if has_kw else q.new_empty(0)
        return dq, dk, dqw, dkw
    if dq_out is None:
        dq_out = torch.zeros_like(q)
    if has_k and dk_out is None:
        dk_out = torch.zeros_like(k)
    k4 = _as_bnhd(k) if has_k else q4
    dq4 = _as_bnhd(dq_out)
    dk4 = _as_bnhd(dk_out) if has_k else dq4
    across = bool(across_heads) and q_weight is not None
    cfg = launch_config(H, D, dev)
    n_prog, per_prog = bwd_programs(n_tokens, cfg.block_t, dev)
    C = H * D if across else D  # weight length
    dqw_p = torch.empty((n_prog, C), dtype=torch.float32, device=dev) if q_weight is not None else q.new_empty(0)
    dkw_p = torch.empty((n_prog, C), dtype=torch.float32, device=dev) if has_kw else q.new_empty(0)
    # across heads: per-token (rstd, mean(dxhat * xhat)) scratch of the two-sweep backward
    q_stats = torch.empty((n_tokens, 2), dtype=torch.float32, device=dev) if across else dqw_p
    k_stats = torch.empty((n_tokens, 2), dtype=torch.float32, device=dev) if across and has_k else q_stats
    S0, S1, S2 = (int(s) for s in sections)
    launch(_rope3d_bwd_kernel, (n_prog,))(
        dq4, dk4, q4, k4, positions,
        q_weight if q_weight is not None else q4, k_weight if has_kw else q4,
        dq, dk if has_k else dq,
        dqw_p if q_weight is not None else dq, dkw_p if has_kw else dq,
        q_stats if q_stats.numel() else dq, k_stats if k_stats.numel() else dq,
        N, H, D, n_tokens, per_prog,
        *_strides3(dq4), *_strides3(dk4), *_strides3(q4), *_strides3(k4), *_pos_strides(positions, q4),
        float(eps), -math.log2(theta),
        S0=S0, S1=S1, S2=S2, INTERLEAVED=bool(interleaved),
        HAS_K=has_k, HAS_QW=q_weight is not None, HAS_KW=has_kw, ACROSS_HEADS=across,
        BLOCK_T=cfg.block_t, BLOCK_H=cfg.block_h, BLOCK_D=cfg.block_d,
        DIV=common_divisor(D, *_strides3(dq4), *_strides3(dk4), *_strides3(q4), *_strides3(k4)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **_bwd_register_cap(cfg, bool(interleaved), q_weight is not None or has_kw),
    )  # fmt: skip
    dqw = dqw_p.sum(0).to(q_weight.dtype) if q_weight is not None else q.new_empty(0)
    dkw = dkw_p.sum(0).to(k_weight.dtype) if has_kw else q.new_empty(0)
    return dq, dk, dqw, dkw


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------


def _rope3d_fwd_fake(q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False):
    return q.new_empty(q.shape), (k.new_empty(k.shape) if k is not None else q.new_empty(0))


@mugv_op("qk_norm_rope3d_fwd", fake=_rope3d_fwd_fake)
def _rope3d_fwd(
    q: Tensor,
    k: Tensor | None,
    positions: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    sections: list[int],
    eps: float,
    theta: float,
    interleaved: bool,
    across_heads: bool = False,
) -> tuple[Tensor, Tensor]:
    """``mugv::qk_norm_rope3d_fwd``: ``(q_out, k_out)``, contiguous, in the inputs' dtype;
    ``k_out`` is empty when ``k`` is None (plain :func:`rope3d`). ``across_heads``: the
    weights are ``[H * D]`` and the RMS runs over all heads of a token."""
    if use_triton(q):
        return _rope3d_fwd_launch(q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads)
    return rope3d_fwd_ref(q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads)


def _rope3d_bwd_fake(
    dq_out, dk_out, q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False
):
    def like(t: Tensor | None) -> Tensor:
        return t.new_empty(t.shape) if t is not None else q.new_empty(0)

    return like(q), like(k), like(q_weight), like(k_weight if k is not None else None)


@mugv_op("qk_norm_rope3d_bwd", fake=_rope3d_bwd_fake)
def _rope3d_bwd(
    dq_out: Tensor | None,
    dk_out: Tensor | None,
    q: Tensor,
    k: Tensor | None,
    positions: Tensor,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    sections: list[int],
    eps: float,
    theta: float,
    interleaved: bool,
    across_heads: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mugv::qk_norm_rope3d_bwd``: ``(dq, dk, dq_weight, dk_weight)``, each empty where
    the input was None; a None output gradient counts as zeros."""
    if use_triton(q):
        return _rope3d_bwd_launch(
            dq_out, dk_out, q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads
        )
    return rope3d_bwd_ref(
        dq_out, dk_out, q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads
    )


def _rope3d_setup_context(ctx, inputs, output):
    q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, positions, q_weight, k_weight)
    ctx.sections, ctx.eps, ctx.theta, ctx.interleaved = list(sections), eps, theta, interleaved
    ctx.across_heads = across_heads


def _rope3d_backward(ctx, dq_out, dk_out):
    q, k, positions, q_weight, k_weight = ctx.saved_tensors
    if dq_out is not None:
        dq_out = last_dim_contiguous(dq_out)
    if dk_out is not None and k is not None:
        dk_out = last_dim_contiguous(dk_out)
    else:
        dk_out = None
    dq, dk, dqw, dkw = torch.ops.mugv.qk_norm_rope3d_bwd(
        dq_out=dq_out, dk_out=dk_out, q=q, k=k, positions=positions, q_weight=q_weight, k_weight=k_weight,
        sections=ctx.sections, eps=ctx.eps, theta=ctx.theta, interleaved=ctx.interleaved,
        across_heads=ctx.across_heads,
    )  # fmt: skip
    return (
        dq, dk if k is not None else None, None, dqw if q_weight is not None else None,
        dkw if k is not None and k_weight is not None else None, None, None, None, None, None,
    )  # fmt: skip


_rope3d_fwd.register_autograd(_rope3d_backward, setup_context=_rope3d_setup_context)


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------


def _check_sections(sections: object, D: int) -> list[int]:
    if isinstance(sections, (str, bytes)) or not isinstance(sections, Sequence):
        raise ValueError(f"sections must be a sequence of three even ints, got {sections!r}")
    try:
        secs = [operator.index(s) for s in sections if not isinstance(s, bool)]
    except TypeError:
        secs = []
    if len(secs) != 3 or len(sections) != 3:
        raise ValueError(f"sections must be three ints (one per position column), got {sections!r}")
    if any(s < 0 or s % 2 for s in secs):
        raise ValueError(f"sections must be even and non-negative (rotated in pairs), got {tuple(secs)}")
    if sum(secs) > D:
        raise ValueError(f"sections must sum to at most head_dim D={D}, got {tuple(secs)} (sum {sum(secs)})")
    return secs


def _check_position_values(positions: Tensor) -> None:
    """Range check of positions in eager mode (one host sync; skipped while compiling)."""
    if positions.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(v) for v in torch.aminmax(positions))
    if lo < 0:
        raise ValueError(f"positions must be non-negative, got a minimum of {lo}")
    if hi >= MAX_POSITION:
        raise ValueError(f"positions must be < 2**24 (exact in fp32), got a maximum of {hi}")


def _check_positions(positions: object, x: Tensor, check_values: bool = True) -> Tensor:
    check_tensor("positions", positions, dtypes=INDEX_DTYPES, device=x.device)
    if x.dim() == 4:
        B, N = x.shape[:2]
        ok = tuple(positions.shape) in ((B, N, 3), (1, N, 3), (N, 3))
        want = f"[B, N, 3] = {(B, N, 3)}, [1, N, 3] or [N, 3]"
    else:
        ok = tuple(positions.shape) == (x.shape[0], 3)
        want = f"[total, 3] = {(x.shape[0], 3)}"
    if not ok:
        raise ValueError(
            f"positions must have shape {want} (one column per section), got {tuple(positions.shape)}"
        )
    if check_values:
        _check_position_values(positions)
    return positions


def _check_weight(name: str, w: Tensor | None, D: int, dev: torch.device, what: str = "head_dim") -> Tensor | None:
    if w is None:
        return None
    check_tensor(name, w, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
    if w.shape[0] != D:
        raise ValueError(f"{name} must have shape ({D},) ({what}), got {tuple(w.shape)}")
    return last_dim_contiguous(w)


def _check_x(name: str, x: object) -> Tensor:
    check_tensor(name, x, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    D = x.shape[-1]
    if D == 0 or D > MAX_D:
        raise ValueError(f"{name} must have 1 <= head_dim <= {MAX_D}, got D={D}")
    return x


def _check_scalars(eps: float, theta: float, interleaved: bool) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"theta must be a positive float, got {theta!r}")
    if not isinstance(interleaved, bool):
        raise ValueError(f"interleaved must be a bool, got {interleaved!r}")


def qk_norm_rope3d(
    q: Tensor,
    k: Tensor | None,
    positions: Tensor,
    sections: Sequence[int],
    *,
    q_weight: Tensor | None = None,
    k_weight: Tensor | None = None,
    eps: float = 1e-6,
    theta: float = 10000.0,
    interleaved: bool = True,
    check_positions: bool = True,
    backend: str = "auto",
    across_heads: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-head RMSNorm of Q and K followed by a 3D rotary embedding, in one pass.

    MUG-V's ``q_norm``/``k_norm`` + ``apply_rotary_emb`` (arXiv 2510.17519; public
    ``mug_v/dit/module.py``), generalized to any section split and both pair layouts.
    Reads q and k once; angles come from the integer positions in the kernel (no
    cos/sin table). Differentiable in q, k, q_weight and k_weight.

    Args:
        q, k: ``[B, N, H, D]`` (padded) or ``[total, H, D]`` (packed variable-length
            batch), same shape and dtype (fp32/bf16/fp16; fp64 runs the reference);
            ``k=None`` normalizes and rotates q alone (``k_out`` is None). Any
            strides with unit stride on D are used as they are (e.g. ``qkv[:, :, 0]`` of a
            fused ``[B, N, 3, H, D]`` projection); other layouts are copied once.
            ``D <= 1024``; a non-power-of-two D (MUG-V: 72) runs in a
            ``next_power_of_2(D)``-lane tile with masked lanes (module docstring).
        positions: int32/int64 ``[B, N, 3]``, ``[1, N, 3]`` or ``[N, 3]`` (shared by the
            batch) for the padded layout, ``[total, 3]`` for the packed one; column ``i``
            drives section ``i``; values in ``[0, 2**24)`` (checked in eager mode, one
            host sync; not checked under ``torch.compile``). See :func:`video_positions`.
        sections: three even ints, ``sum(sections) <= D``; section ``i`` covers dims
            ``[sum(sections[:i]), sum(sections[:i+1]))``; dims past the sum pass through
            unrotated. MUG-V: ``(24, 24, 24)`` for (h, w, t).
        q_weight, k_weight: ``[D]`` RMSNorm weights (any float dtype); when given, that
            tensor is RMS-normalized over D (fp32 statistics) and scaled before the
            rotation; None skips its norm. With ``across_heads`` both are ``[H * D]``
            (or both None).
        eps: added to the mean square (default 1e-6, as MUG-V).
        theta: RoPE base (default 1e4). Section ``i``, pair ``j`` turns by
            ``positions[..., i] * theta ** (-2j / sections[i])`` (angles in fp32).
        interleaved: True pairs ``(2j, 2j+1)`` inside each section (MUG-V,
            ``view_as_complex``); False pairs ``j`` with ``j + d/2`` (rotate-half).
        check_positions: range-check the position values (one host sync per call in
            eager mode). A model that calls this in every block with the same positions
            can check them once and pass False to the blocks.
        backend: ``"auto"`` (default: the Triton kernel on CUDA and under
            ``TRITON_INTERPRET=1``, the explicit reference on plain CPU and in fp64),
            ``"triton"`` or ``"reference"`` (the differentiable PyTorch reference
            :func:`mugv_kernels.reference.qk_norm_rope3d_ref`, no custom op).
        across_heads: RMS over all heads of a token (``H * D`` values, weights ``[H * D]``)
            instead of per head: Wan's ``rms_norm_across_heads`` QK norm
            (``torch.nn.RMSNorm(H * D)`` on the projection, then the heads' RoPE), still one
            op. The kernel first sweeps the token's heads for the statistic (a second
            read of the same rows, from L1/L2), and its backward runs two sweeps with a
            ``[tokens, 2]`` fp32 scratch of per-token statistics.

    Returns:
        ``(q_out, k_out)``: same shapes as q and k, in the input dtype (contiguous from
        the kernel); ``k_out`` is None when k is.

    Raises:
        TypeError: q/k/weights/positions not tensors; q/k/weights of an unsupported float
            dtype, positions not int32/int64, or a q/k dtype mismatch.
        ValueError: wrong ranks, q/k shape mismatch, D out of range, sections not three
            even non-negative ints or summing past D, positions of the wrong shape or
            device, negative or too large positions, weight shape != [D] (!= [H * D]
            with ``across_heads``, or only one of two weights given), eps <= 0,
            theta <= 0, ``across_heads`` not a bool, an unknown backend (or one that
            cannot run here).
    """
    q = _check_x("q", q)
    if k is not None:
        check_tensor("k", k, dtypes=FLOAT_DTYPES, device=q.device)
        if k.shape != q.shape:
            raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"k dtype {k.dtype} != q dtype {q.dtype}")
    elif k_weight is not None:
        raise ValueError("k_weight needs k")
    if not isinstance(across_heads, bool):
        raise ValueError(f"across_heads must be a bool, got {across_heads!r}")
    D = q.shape[-1]
    secs = _check_sections(sections, D)
    _check_scalars(eps, theta, interleaved)
    positions = _check_positions(positions, q, check_positions)
    C, what = (q.shape[-2] * D, "heads * head_dim, across_heads") if across_heads else (D, "head_dim")
    q_weight = _check_weight("q_weight", q_weight, C, q.device, what)
    k_weight = _check_weight("k_weight", k_weight, C, q.device, what)
    if across_heads and k is not None and (q_weight is None) != (k_weight is None):
        raise ValueError("across_heads needs both q_weight and k_weight, or neither")
    if check_backend(backend, q, choices=BACKENDS) == "reference":
        args = (eps, theta, interleaved, across_heads)
        q_out = qk_norm_rope3d_ref(q, positions, secs, q_weight, *args)
        return q_out, (qk_norm_rope3d_ref(k, positions, secs, k_weight, *args) if k is not None else None)
    q = last_dim_contiguous(q)
    k = last_dim_contiguous(k) if k is not None else None
    q_out, k_out = torch.ops.mugv.qk_norm_rope3d_fwd(
        q=q, k=k, positions=positions, q_weight=q_weight, k_weight=k_weight, sections=secs,
        eps=float(eps), theta=float(theta), interleaved=interleaved, across_heads=across_heads,
    )  # fmt: skip
    return q_out, (k_out if k is not None else None)


def rope3d(
    x: Tensor,
    positions: Tensor,
    sections: Sequence[int],
    *,
    theta: float = 10000.0,
    interleaved: bool = True,
    check_positions: bool = True,
    backend: str = "auto",
) -> Tensor:
    """3D rotary embedding of one tensor (no norm): :func:`qk_norm_rope3d` for a single
    input. Differentiable in x.

    Args:
        x: ``[B, N, H, D]`` or ``[total, H, D]``, fp32/bf16/fp16 (fp64: reference), unit
            stride on D used without a copy.
        positions, sections, theta, interleaved, check_positions, backend: as
            :func:`qk_norm_rope3d`.

    Returns:
        Same shape as x, in ``x.dtype`` (contiguous from the kernel).

    Raises:
        TypeError / ValueError: as :func:`qk_norm_rope3d`.
    """
    x = _check_x("x", x)
    secs = _check_sections(sections, x.shape[-1])
    _check_scalars(1e-6, theta, interleaved)
    positions = _check_positions(positions, x, check_positions)
    if check_backend(backend, x, choices=BACKENDS) == "reference":
        return qk_norm_rope3d_ref(x, positions, secs, None, 1e-6, theta, interleaved)
    x = last_dim_contiguous(x)
    return torch.ops.mugv.qk_norm_rope3d_fwd(
        q=x, k=None, positions=positions, q_weight=None, k_weight=None, sections=secs,
        eps=1e-6, theta=float(theta), interleaved=interleaved,
    )[0]  # fmt: skip


_AXES = ("t", "h", "w")


def video_positions(
    T: int,
    H: int,
    W: int,
    *,
    start_end_tokens: bool = True,
    order: Sequence[str] = ("h", "w", "t"),
    t_offset: int | None = None,
    dtype: torch.dtype = torch.int32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integer 3D positions of a video's tokens, in MUG-V's token order.

    Tokens are frame-major, then row (h), then column (w). With ``start_end_tokens``
    (MUG-V, public ``MUGDiT.get_freq_cis``) the frames use ``t = 1..T``, a start token at
    ``(t, h, w) = (0, 0, 0)`` comes first and an end token at ``(T + 1, H - 1, W - 1)``
    last; without them frames use ``t = t_offset..t_offset + T - 1`` (``t_offset``
    defaults to 1 with the tokens, 0 without).

    Args:
        T, H, W: latent frames, patch rows and patch columns (non-negative ints).
        start_end_tokens: add MUG-V's learned start/end tokens' positions.
        order: the axis of each output column, a permutation of ``("t", "h", "w")``;
            MUG-V's sections are ``(h, w, t)``, the default.
        t_offset: time position of the first frame (see above).
        dtype: int32 (default) or int64.
        device: where to build the tensor.

    Returns:
        ``[T*H*W + 2, 3]`` (``[T*H*W, 3]`` without the start/end tokens; ``[0, 3]``
        when ``T*H*W == 0``) of ``dtype``, ready as ``positions`` for
        :func:`qk_norm_rope3d` with ``sections`` in ``order``.

    Raises:
        TypeError: a dtype other than int32/int64.
        ValueError: negative sizes, ``order`` not a permutation of t/h/w, a negative
            ``t_offset``.
    """
    for name, v in (("T", T), ("H", H), ("W", W)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    order = tuple(order)
    if sorted(order) != sorted(_AXES):
        raise ValueError(f"order must be a permutation of ('t', 'h', 'w'), got {order!r}")
    if dtype not in INDEX_DTYPES:
        raise TypeError(f"dtype must be int32 or int64, got {dtype}")
    if t_offset is None:
        t_offset = 1 if start_end_tokens else 0
    if not isinstance(t_offset, int) or t_offset < 0:
        raise ValueError(f"t_offset must be a non-negative int, got {t_offset!r}")
    n = T * H * W
    idx = torch.arange(n, device=device, dtype=torch.int64)
    hw = max(H * W, 1)
    axis = {"t": idx // hw + t_offset, "h": (idx // max(W, 1)) % max(H, 1), "w": idx % max(W, 1)}
    pos = torch.stack([axis[a] for a in order], dim=-1)
    if start_end_tokens and n > 0:
        start = {"t": 0, "h": 0, "w": 0}
        end = {"t": t_offset + T, "h": H - 1, "w": W - 1}
        first = torch.tensor([[start[a] for a in order]], device=device, dtype=torch.int64)
        last = torch.tensor([[end[a] for a in order]], device=device, dtype=torch.int64)
        pos = torch.cat([first, pos, last])
    return pos.to(dtype)


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile cases: the launches the ops make at the benchmark shapes
# ----------------------------------------------------------------------------------------


@register_aot_cases("rope")
def _aot_cases() -> None:
    """MUG-V 10B self-attention (48 heads x 72, sections (24, 24, 24), interleaved) at the
    5 s and 3 s 720p token counts, bf16: fused QK-norm + RoPE forward/backward and plain
    RoPE, positions int32 and int64; plus a Wan-style head_dim 128 with uneven sections
    (44, 42, 42) in both pair layouts, and Wan2.1-14B's across-heads QK norm + RoPE
    (40 heads x 128, 75,600 tokens: q and k, and one tensor alone as the cross-attention
    norms run)."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    cases = [(50402, 48, 72, (24, 24, 24), True), (36002, 48, 72, (24, 24, 24), True)]
    cases += [(32760, 40, 128, (44, 42, 42), True), (32760, 40, 128, (44, 42, 42), False)]
    for N, H, D, secs, inter in cases:
        q = torch.empty(1, N, H, D, **meta)
        k = torch.empty(1, N, H, D, **meta)
        w = torch.empty(D, **meta)
        for pos_dtype in (torch.int32, torch.int64):
            pos = torch.empty(N, 3, device="meta", dtype=pos_dtype)
            for qw, kw, kk in ((w, w, k), (None, None, k), (None, None, None)):
                _rope3d_fwd_launch(q, kk, pos, qw, kw, secs, 1e-6, 10000.0, inter)
                _rope3d_bwd_launch(q, kk, q, kk, pos, qw, kw, secs, 1e-6, 10000.0, inter)
    N, H, D = 75600, 40, 128
    q = torch.empty(1, N, H, D, **meta)
    w = torch.empty(H * D, **meta)
    pos = torch.empty(N, 3, device="meta", dtype=torch.int32)
    for kk, kw in ((q, w), (None, None)):
        _rope3d_fwd_launch(q, kk, pos, w, kw, (44, 42, 42), 1e-6, 10000.0, True, across_heads=True)
        _rope3d_bwd_launch(q, kk, q, kk, pos, w, kw, (44, 42, 42), 1e-6, 10000.0, True, across_heads=True)
