"""GroupNorm + SiLU for the video VAE, fused (forward and backward), any memory format.

The VAE's ``nn.GroupNorm(G, C)`` followed by ``nn.SiLU`` (GroupNorm: Wu & He, arXiv
1803.08494; SiLU: Elfwing et al., arXiv 1702.03118) is, per sample ``b`` and group ``g`` of
``Cg = C / G`` channels, with statistics in fp32 over the group's channels and positions::

    xhat = (x - mean[b, g]) * rstd[b, g]        rstd = 1 / sqrt(var + eps)
    z    = xhat * weight[c] + bias[c]
    y    = z * sigmoid(z)                       (silu=False: y = z)

Eager PyTorch makes three passes plus a copy (aten GroupNorm is slow on channels-last
and ``F.silu`` re-reads its output). Here ``x`` is viewed as ``[B, C, S]`` with its own
strides (NCDHW: positions contiguous; channels-last: channels contiguous), and:

* forward: a statistics kernel over ``(b, tile of groups, chunk of positions)`` giving
  per-group, per-chunk ``(mean, M2)`` (Welford per channel over the chunk's tiles, then
  merged over the group's channels) merged on the host (Chan et al.'s parallel variance:
  no cancellation), then one elementwise pass writing ``y`` in ``x``'s layout;
* backward, with ``dz = dy * s * (1 + z * (1 - s))`` (``s = sigmoid(z)``) and
  ``dxhat = dz * weight``: a partial-sum kernel (``dweight += dz * xhat``,
  ``dbias += dz`` per channel; per group ``sum dxhat`` and ``sum dxhat * xhat`` from
  them, as ``sum_c weight[c] * dbias_c`` and ``sum_c weight[c] * dweight_c``; fp32
  partials per chunk), then
  ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``.

``backend="cuda"`` runs the forward of ``csrc/group_norm.cu`` (same outputs); its backward
is the Triton one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mugv_kernels._align import common_divisor, multiple
from mugv_kernels._registry import (
    CSRC_BACKENDS,
    INTERPRET,
    check_backend,
    cuda_extension,
    launch,
    mugv_op,
    register_aot_cases,
    use_triton,
)
from mugv_kernels._validate import FLOAT_DTYPES, check_dtype, check_tensor
from mugv_kernels.reference.group_norm import group_norm_silu_bwd_ref, group_norm_silu_ref, group_norm_stats_ref

__all__ = ["BACKENDS", "group_norm_silu"]

BACKENDS = CSRC_BACKENDS  # the backend= values of group_norm_silu


# ----------------------------------------------------------------------------------------
# Kernels: program (b * G / GPT + t, chunk) covers positions [chunk*s_per_chunk, ...) of
# the GPT consecutive groups g0 = t * GPT ... g0 + GPT - 1 (GPT * Cg channels), in
# [BLOCK_S, BLOCK_C] tiles, BLOCK_C = GPT * BLOCK_CG (int64 offsets). Column k of a tile
# belongs to group g0 + k // BLOCK_CG; every per-group quantity is reduced over the
# columns of its group at the end (reshape to [GPT, BLOCK_CG] and sum), never per tile.
# GPT = 1: one group per tile, Cg <= BLOCK_CG (masked). GPT > 1 (the launcher's choice
# when channels are innermost and one group's run is under 16 bytes, e.g. 4 bf16
# channels): Cg == BLOCK_CG, a power of two, and the tile's GPT * Cg channels are one
# contiguous run, moved in 128-bit accesses.
# DIV (the power of two <= 16 dividing Cg, from the launcher) tells the compiler that a
# group's channels start at a multiple of DIV (mugv_kernels._align): channels-last tiles
# then move each group's run of Cg >= 8 bf16 channels in 128-bit accesses.
# ----------------------------------------------------------------------------------------


@triton.jit
def _gn_channels(Cg, G, GPT: tl.constexpr, BLOCK_CG: tl.constexpr, DIV: tl.constexpr):
    """What every program starts with: ``(b, bg0, chunk, ch, c_ok)``: its sample, first
    ``b * G + g`` row of the statistics, chunk, its tile columns' channels (int64) and
    their mask."""
    if GPT > 1:
        Cg = BLOCK_CG  # the launcher guarantees it: the tile's channels are contiguous
    else:
        Cg = multiple(Cg, DIV)
    GT = G // GPT
    bt = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (bt // GT).to(tl.int64)
    g0 = (bt % GT) * GPT
    bg0 = b * G + g0
    k = tl.arange(0, GPT * BLOCK_CG)
    c_ok = k < GPT * Cg
    ch = (g0 * Cg + k).to(tl.int64)
    return b, bg0, chunk, ch, c_ok


@triton.jit
def _gn_group_sum(v, GPT: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Per-group sums ``[GPT]`` of a per-column vector ``[GPT * BLOCK_CG]``."""
    return tl.sum(tl.reshape(v, [GPT, BLOCK_CG]), axis=1)


@triton.jit
def _gn_per_column(P, bg0, GPT: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Per-group values ``P[bg0 : bg0 + GPT]`` (fp32) repeated over each group's columns,
    ``[GPT * BLOCK_CG]``: one contiguous load of ``GPT`` values."""
    v = tl.load(P + bg0 + tl.arange(0, GPT))
    return tl.reshape(tl.broadcast_to(v[:, None], [GPT, BLOCK_CG]), [GPT * BLOCK_CG])


@triton.jit
def _gn_stats_kernel(
    X, PMEAN, PM2, S, Cg, G, s_per_chunk, n_chunks, sxb, sxc, sxs,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr, GPT: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    # per column: Welford over the tiles (each tile's (mean, M2) merged by Chan's rule);
    # per group at the end: Chan's merge of its Cg columns of equal count n
    b, bg0, chunk, ch, c_ok = _gn_channels(Cg, G, GPT, BLOCK_CG, DIV)
    base = X + b * sxb + ch * sxc
    s_start = chunk.to(tl.int64) * s_per_chunk
    s_end = tl.minimum(s_start + s_per_chunk, S)
    n = 0.0
    mean = tl.zeros([GPT * BLOCK_CG], dtype=tl.float32)
    m2 = tl.zeros([GPT * BLOCK_CG], dtype=tl.float32)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)  # int64 even where s0 is a Python int (interpreter)
        mask = (s < s_end)[:, None] & c_ok[None, :]
        x = tl.load(base[None, :] + s[:, None] * sxs, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        t_mean = tl.sum(x, axis=0) / cnt
        d = tl.where(mask, x - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        delta = t_mean - mean
        tot = n + cnt
        mean = mean + delta * (cnt / tot)
        m2 = m2 + t_m2 + delta * delta * (n * cnt / tot)
        n = tot
    if GPT > 1:
        cg = BLOCK_CG
    else:
        cg = multiple(Cg, DIV)
    g_mean = _gn_group_sum(mean, GPT, BLOCK_CG) / cg
    dev = tl.reshape(mean, [GPT, BLOCK_CG]) - g_mean[:, None]
    dev = tl.where(tl.reshape(c_ok, [GPT, BLOCK_CG]), dev, 0.0)
    g_m2 = _gn_group_sum(m2, GPT, BLOCK_CG) + n * tl.sum(dev * dev, axis=1)
    rows = (bg0 + tl.arange(0, GPT)) * n_chunks + chunk
    tl.store(PMEAN + rows, g_mean)
    tl.store(PM2 + rows, g_m2)


@triton.jit
def _gn_group_params(
    MEAN, RSTD, W, BIAS, Cg, G,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_CG: tl.constexpr, GPT: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    """:func:`_gn_channels`, then each column's group statistics ``mean``/``rstd`` and the
    affine ``scale``/``shift`` (1 and 0 where absent), ``[GPT * BLOCK_CG]`` fp32."""
    b, bg0, chunk, ch, c_ok = _gn_channels(Cg, G, GPT, BLOCK_CG, DIV)
    mean = _gn_per_column(MEAN, bg0, GPT, BLOCK_CG)
    rstd = _gn_per_column(RSTD, bg0, GPT, BLOCK_CG)
    scale = tl.full([GPT * BLOCK_CG], 1.0, tl.float32)
    if HAS_W:
        scale = tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([GPT * BLOCK_CG], dtype=tl.float32)
    if HAS_B:
        shift = tl.load(BIAS + ch, mask=c_ok, other=0.0).to(tl.float32)
    return b, bg0, chunk, ch, c_ok, mean, rstd, scale, shift


@triton.jit
def _gn_apply_kernel(
    X, Y, MEAN, RSTD, W, BIAS, S, Cg, G, s_per_chunk, sxb, sxc, sxs, syb, syc, sys,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr, GPT: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    b, bg0, chunk, ch, c_ok, mean, rstd, scale, shift = _gn_group_params(
        MEAN, RSTD, W, BIAS, Cg, G, HAS_W, HAS_B, BLOCK_CG, GPT, DIV
    )
    # z = x * a + d with a = rstd * w, d = bias - mean * rstd * w
    a = scale * rstd
    d = shift - mean * a
    s_start = chunk.to(tl.int64) * s_per_chunk
    s_end = tl.minimum(s_start + s_per_chunk, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)  # int64 even where s0 is a Python int (interpreter)
        mask = (s < s_end)[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + ch[None, :] * sxc + s[:, None] * sxs, mask=mask, other=0.0).to(tl.float32)
        z = x * a[None, :] + d[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + b * syb + ch[None, :] * syc + s[:, None] * sys, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_dz(x, dy, mean, rstd, scale, shift, SILU: tl.constexpr):
    """``(xhat, dz)`` of one tile (per-column ``mean``/``rstd``/``scale``/``shift``):
    ``dz = dL/dz`` through the SiLU."""
    xhat = (x - mean[None, :]) * rstd[None, :]
    if SILU:
        z = xhat * scale[None, :] + shift[None, :]
        sg = tl.sigmoid(z)
        dz = dy * sg * (1.0 + z * (1.0 - sg))
    else:
        dz = dy
    return xhat, dz


@triton.jit
def _gn_bwd_partial_kernel(
    X, DY, MEAN, RSTD, W, BIAS, DW_P, DB_P, PS1, PS2,
    S, C, Cg, G, s_per_chunk, n_chunks, sxb, sxc, sxs, sdb, sdc, sds,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr, GPT: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    b, bg0, chunk, ch, c_ok, mean, rstd, scale, shift = _gn_group_params(
        MEAN, RSTD, W, BIAS, Cg, G, HAS_W, HAS_B, BLOCK_CG, GPT, DIV
    )
    acc_w = tl.zeros([GPT * BLOCK_CG], dtype=tl.float32)
    acc_b = tl.zeros([GPT * BLOCK_CG], dtype=tl.float32)
    s_start = chunk.to(tl.int64) * s_per_chunk
    s_end = tl.minimum(s_start + s_per_chunk, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)  # int64 even where s0 is a Python int (interpreter)
        mask = (s < s_end)[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + ch[None, :] * sxc + s[:, None] * sxs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + b * sdb + ch[None, :] * sdc + s[:, None] * sds, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _gn_dz(x, dy, mean, rstd, scale, shift, SILU)
        xhat = tl.where(mask, xhat, 0.0)
        dz = tl.where(mask, dz, 0.0)
        acc_b += tl.sum(dz, axis=0)
        acc_w += tl.sum(dz * xhat, axis=0)
    p = (b * n_chunks + chunk) * C + ch
    tl.store(DW_P + p, acc_w, mask=c_ok)
    tl.store(DB_P + p, acc_b, mask=c_ok)
    # sum(dxhat) = sum_c w_c * sum(dz) and sum(dxhat * xhat) = sum_c w_c * sum(dz * xhat)
    # over each group's channels c (dxhat = dz * w; masked columns hold 0)
    rows = (bg0 + tl.arange(0, GPT)) * n_chunks + chunk
    tl.store(PS1 + rows, _gn_group_sum(acc_b * scale, GPT, BLOCK_CG))
    tl.store(PS2 + rows, _gn_group_sum(acc_w * scale, GPT, BLOCK_CG))


@triton.jit
def _gn_bwd_dx_kernel(
    X, DY, DX, MEAN, RSTD, C1, C2, W, BIAS,
    S, Cg, G, s_per_chunk, sxb, sxc, sxs, sdb, sdc, sds, sob, soc, sos,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr, GPT: tl.constexpr, DIV: tl.constexpr,
):  # fmt: skip
    b, bg0, chunk, ch, c_ok, mean, rstd, scale, shift = _gn_group_params(
        MEAN, RSTD, W, BIAS, Cg, G, HAS_W, HAS_B, BLOCK_CG, GPT, DIV
    )
    c1 = _gn_per_column(C1, bg0, GPT, BLOCK_CG)[None, :]
    c2 = _gn_per_column(C2, bg0, GPT, BLOCK_CG)[None, :]
    s_start = chunk.to(tl.int64) * s_per_chunk
    s_end = tl.minimum(s_start + s_per_chunk, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)  # int64 even where s0 is a Python int (interpreter)
        mask = (s < s_end)[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + ch[None, :] * sxc + s[:, None] * sxs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + b * sdb + ch[None, :] * sdc + s[:, None] * sds, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _gn_dz(x, dy, mean, rstd, scale, shift, SILU)
        dx = rstd[None, :] * (dz * scale[None, :] - c1 - xhat * c2)
        tl.store(DX + b * sob + ch[None, :] * soc + s[:, None] * sos, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


def bcs_strides(t: Tensor) -> tuple[int, int, int] | None:
    """Strides ``(batch, channel, position)`` of ``t [B, C, *spatial]`` viewed as
    ``[B, C, S]``, or None when its spatial dimensions do not collapse to one stride."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    ss = dims[-1][1] if dims else 1
    return t.stride(0), t.stride(1), ss


def _dense(t: Tensor) -> Tensor:
    """``t`` when its positions collapse to one stride (contiguous, channels-last), else
    a contiguous copy."""
    return t if bcs_strides(t) is not None else t.contiguous()


INTERPRET_TILE_ELEMS = 16384
"""Tile size (elements) under the interpreter; tests shrink it to run many tiles and chunks."""
CPU_PROGRAMS = 2
"""Programs to aim for on CPU (the interpreter); tests raise it to split groups into chunks."""


def groups_per_tile(Cg: int, G: int, channel_stride: int, element_size: int) -> int:
    """Groups a tile spans (``GPT``): 1, unless channels are innermost (``channel_stride``
    1), ``Cg`` is a power of two and one group's channels are a run under 16 bytes (e.g.
    4 bf16 channels, the VAE's 128 channels in 32 groups); then the fewest consecutive
    groups, a power of two dividing ``G``, whose channels make a 16-byte run (128-bit
    accesses), as far as ``G`` allows."""
    if channel_stride != 1 or Cg < 1 or Cg & (Cg - 1):
        return 1
    gpt = 1
    while gpt * Cg * element_size < 16 and G % (2 * gpt) == 0:
        gpt *= 2
    return gpt


def gn_config(
    S: int, Cg: int, BG: int, device: torch.device, *, backward: bool = False, groups_per_tile: int = 1
) -> tuple[int, int, int, int]:
    """``(BLOCK_S, BLOCK_C, s_per_chunk, num_warps)`` for ``BG`` (sample, group) pairs
    covered ``groups_per_tile`` at a time (``BLOCK_C = groups_per_tile *
    next_power_of_2(Cg)`` channels): tiles of ~4K elements (2K in the backward, which
    holds two inputs) over 8 warps, ~4 programs per SM over ``(b, group tile, chunk)``;
    the interpreter takes bigger tiles and few chunks."""
    block_c = groups_per_tile * triton.next_power_of_2(max(Cg, 1))
    elems = INTERPRET_TILE_ELEMS if INTERPRET else (2048 if backward else 4096)
    block_s = max(1, elems // block_c)
    block_s = min(block_s, triton.next_power_of_2(max(S, 1)))
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = CPU_PROGRAMS
    programs = max(BG // groups_per_tile, 1)
    chunks = max(1, min(triton.cdiv(target, programs), triton.cdiv(S, block_s)))
    s_per_chunk = triton.cdiv(triton.cdiv(max(S, 1), chunks), block_s) * block_s
    # 8 warps: ~16 (forward) / 8 (backward) elements per thread keeps the int64 pointer
    # tiles in registers at a useful occupancy (4 warps need ~250 registers on sm_90a)
    return block_s, block_c, s_per_chunk, 4 if INTERPRET else 8


def _gn_fwd_launch(x, weight, bias, num_groups, eps, silu):
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    G, Cg = num_groups, C // num_groups
    y = torch.empty_like(x)
    mean = torch.zeros((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.full((B, G), 1.0 / math.sqrt(eps), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean, rstd
    sx, sy = bcs_strides(x), bcs_strides(y)
    gpt = groups_per_tile(Cg, G, sx[1], x.element_size())
    block_s, block_c, s_per_chunk, warps = gn_config(S, Cg, B * G, x.device, groups_per_tile=gpt)
    n_chunks = triton.cdiv(S, s_per_chunk)
    pmean = torch.empty((B * G, n_chunks), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    launch(_gn_stats_kernel, (B * G // gpt, n_chunks))(
        x, pmean, pm2, S, Cg, G, s_per_chunk, n_chunks, *sx,
        BLOCK_S=block_s, BLOCK_CG=block_c // gpt, GPT=gpt, DIV=common_divisor(Cg), num_warps=warps,
    )  # fmt: skip
    # merge the per-chunk (mean, M2) (Chan et al.): exact in fp32 without cancellation
    starts = torch.arange(n_chunks, device=x.device, dtype=torch.float32) * s_per_chunk
    cnt = (torch.clamp(S - starts, max=s_per_chunk) * Cg)[None, :]
    total = float(S * Cg)
    mean = (pmean * cnt).sum(1) / total
    m2 = pm2.sum(1) + ((pmean - mean[:, None]) ** 2 * cnt).sum(1)
    rstd = torch.rsqrt(m2 / total + eps)
    launch(_gn_apply_kernel, (B * G // gpt, n_chunks))(
        x, y, mean, rstd, weight if weight is not None else x, bias if bias is not None else x,
        S, Cg, G, s_per_chunk, *sx, *sy,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_S=block_s, BLOCK_CG=block_c // gpt, GPT=gpt, DIV=common_divisor(Cg), num_warps=warps,
    )  # fmt: skip
    return y, mean.view(B, G), rstd.view(B, G)


def _gn_bwd_launch(dy, x, weight, bias, mean, rstd, num_groups, silu):
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    G, Cg = num_groups, C // num_groups
    dev = x.device
    dx = torch.empty_like(x)
    if x.numel() == 0:
        zeros = torch.zeros(C, dtype=torch.float32, device=dev)
        return dx, zeros, zeros.clone()
    sx, sd, so = bcs_strides(x), bcs_strides(dy), bcs_strides(dx)
    gpt = groups_per_tile(Cg, G, sx[1], x.element_size())
    block_s, block_c, s_per_chunk, warps = gn_config(S, Cg, B * G, dev, backward=True, groups_per_tile=gpt)
    n_chunks = triton.cdiv(S, s_per_chunk)
    dw_p = torch.empty((B * n_chunks, C), dtype=torch.float32, device=dev)
    db_p = torch.empty_like(dw_p)
    ps1 = torch.empty((B * G, n_chunks), dtype=torch.float32, device=dev)
    ps2 = torch.empty_like(ps1)
    common = dict(
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK_S=block_s, BLOCK_CG=block_c // gpt,
        GPT=gpt, DIV=common_divisor(Cg),
    )
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    launch(_gn_bwd_partial_kernel, (B * G // gpt, n_chunks))(
        x, dy, mean, rstd, w_arg, b_arg, dw_p, db_p, ps1, ps2,
        S, C, Cg, G, s_per_chunk, n_chunks, *sx, *sd, **common, num_warps=warps,
    )  # fmt: skip
    n = float(S * Cg)
    c1 = ps1.sum(1) / n
    c2 = ps2.sum(1) / n
    launch(_gn_bwd_dx_kernel, (B * G // gpt, n_chunks))(
        x, dy, dx, mean, rstd, c1, c2, w_arg, b_arg,
        S, Cg, G, s_per_chunk, *sx, *sd, *so, **common, num_warps=warps,
    )  # fmt: skip
    return dx, dw_p.sum(0), db_p.sum(0)


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------


def _gn_fwd_fake(x, weight, bias, num_groups, eps, silu):
    B = x.shape[0]
    stats = x.new_empty((B, num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@mugv_op("group_norm_silu_fwd", fake=_gn_fwd_fake)
def _gn_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``mugv::group_norm_silu_fwd``: ``(y, mean, rstd)``, statistics ``[B, G]`` fp32."""
    if use_triton(x):
        return _gn_fwd_launch(x, weight, bias, num_groups, eps, silu)
    y = group_norm_silu_ref(x, num_groups, weight, bias, eps=eps, silu=silu)
    mean, rstd = group_norm_stats_ref(x, num_groups, eps)
    return torch.empty_like(x).copy_(y), mean, rstd


@torch.library.custom_op("mugv::group_norm_silu_fwd_cuda", mutates_args=())
def _gn_fwd_cuda(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``mugv::group_norm_silu_fwd_cuda``: the forward by ``csrc/group_norm.cu``."""
    ext = cuda_extension()
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    y = torch.empty_like(x)
    mean = torch.zeros((B, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd.fill_(1.0 / math.sqrt(eps))
    w = weight.float().contiguous() if weight is not None else None
    b = bias.float().contiguous() if bias is not None else None
    dtype_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    ext.group_norm_silu_fwd(
        x.data_ptr(), y.data_ptr(), w.data_ptr() if w is not None else 0, b.data_ptr() if b is not None else 0,
        mean.data_ptr(), rstd.data_ptr(), dtype_code, B, C, S, num_groups, *bcs_strides(x), *bcs_strides(y),
        float(eps), bool(silu), torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip
    return y, mean, rstd


_gn_fwd_cuda.register_fake(_gn_fwd_fake)


def _param_grad_dtype(x: Tensor) -> torch.dtype:
    """dweight/dbias of the bwd op: fp32 partial sums (fp64 for the fp64 reference)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gn_bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, silu):
    C, dt = x.shape[1], _param_grad_dtype(x)
    return torch.empty_like(x), x.new_empty(C, dtype=dt), x.new_empty(C, dtype=dt)


@mugv_op("group_norm_silu_bwd", fake=_gn_bwd_fake)
def _gn_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``mugv::group_norm_silu_bwd``: ``(dx, dweight, dbias)``, the parameter gradients
    ``[C]`` in fp32 (fp64 for fp64 x), cast to the parameters' dtype by the autograd wrapper."""
    if use_triton(x):
        return _gn_bwd_launch(dy, x, weight, bias, mean, rstd, num_groups, silu)
    dx, dw, db = group_norm_silu_bwd_ref(dy, x, weight, bias, num_groups, eps, silu)
    dt = _param_grad_dtype(x)
    zeros = torch.zeros(x.shape[1], dtype=dt, device=x.device)
    return (
        torch.empty_like(x).copy_(dx),
        dw.to(dt) if dw is not None else zeros,
        db.to(dt) if db is not None else zeros.clone(),
    )


def _gn_setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.args = (num_groups, eps, silu)


def _gn_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps, silu = ctx.args
    dx, dw, db = torch.ops.mugv.group_norm_silu_bwd(
        dy=_dense(dy), x=x, weight=weight, bias=bias, mean=mean, rstd=rstd, num_groups=num_groups, eps=eps, silu=silu
    )
    return (
        dx,
        dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None,
        db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None,
        None, None, None,
    )  # fmt: skip


_gn_fwd.register_autograd(_gn_backward, setup_context=_gn_setup_context)
_gn_fwd_cuda.register_autograd(_gn_backward, setup_context=_gn_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-6,
    silu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` in one fused pass.

    ``F.silu(F.group_norm(x, num_groups, weight, bias, eps))`` (GroupNorm: Wu & He,
    arXiv 1803.08494 Sec. 3; the VAE's ``GroupNorm`` + ``SiLU`` pair), statistics in fp32
    over each group's ``C // num_groups`` channels and all positions.

    Args:
        x: ``[B, C, *spatial]`` (e.g. ``[B, C, T, H, W]``) fp32/bf16/fp16 (fp64 runs the
            reference), contiguous or channels-last (other layouts are copied once).
        num_groups: G, a positive divisor of C.
        weight, bias: ``[C]`` per-channel affine, or None (1 and 0).
        eps: added to the variance (default 1e-6, as the VAE).
        silu: apply SiLU (default True); False gives a plain GroupNorm.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (the ``csrc`` forward; CUDA
            tensors, fp32/bf16/fp16) or ``"reference"``, as :func:`mugv_kernels.causal_conv3d`.

    Returns:
        ``y`` with ``x``'s shape, dtype and memory format. Differentiable in ``x``,
        ``weight`` and ``bias``.

    Raises:
        TypeError: a non-tensor; an unsupported dtype (also ``backend="cuda"`` with
            fp64).
        ValueError: ``x`` with fewer than 2 dimensions; ``num_groups`` not a positive
            divisor of C; weight/bias not ``[C]``; eps <= 0; an unknown backend (or one
            that cannot run here); mixed devices.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        check_dtype(name, t, FLOAT_DTYPES)
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial] (at least 2-D), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of C={C}, got {num_groups!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1, device=x.device)
            if p.shape[0] != C:
                raise ValueError(f"{name} must have shape ({C},), got {tuple(p.shape)}")
    backend = check_backend(backend, x, choices=BACKENDS, cuda_dtypes=(torch.float32, torch.bfloat16, torch.float16))
    if backend == "reference":
        return group_norm_silu_ref(x, num_groups, weight, bias, eps=eps, silu=silu)
    x = _dense(x)
    op = torch.ops.mugv.group_norm_silu_fwd_cuda if backend == "cuda" else torch.ops.mugv.group_norm_silu_fwd
    return op(x=x, weight=weight, bias=bias, num_groups=num_groups, eps=float(eps), silu=bool(silu))[0]


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# ----------------------------------------------------------------------------------------


@register_aot_cases("group_norm")
def _aot_cases() -> None:
    """The VAE's GroupNorm(32) + SiLU at the 720p stages (bf16): 512 channels at
    ``48 x 90 x 160``, 256 at ``24 x 180 x 320``, 128 at ``12 x 360 x 640``, NCDHW and
    channels-last; forward and backward."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    for shape in ((1, 512, 48, 90, 160), (1, 256, 24, 180, 320), (1, 128, 12, 360, 640)):
        for cl in (False, True):
            x = torch.empty(shape, **meta)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            w = torch.empty(shape[1], **meta)
            y, mean, rstd = _gn_fwd_launch(x, w, w, 32, 1e-6, True)
            _gn_bwd_launch(y, x, w, w, mean, rstd, 32, True)
