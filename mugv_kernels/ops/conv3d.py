"""Causal 3D convolution for the video VAE: implicit GEMM with the padding fused.

The VAE's ``CausalConv3d`` (Open-Sora / MUG-V public code; causal padding from MAGVIT-v2,
arXiv 2310.05737 Sec. 3.1) is ``F.pad`` (time: causal or MUG-V's symmetric split; space:
zeros) followed by ``F.conv3d``. ``F.pad`` copies every activation (and silently returns
NCDHW). Here the convolution is an implicit GEMM over the *virtual* padded input::

    y[b, co, to, ho, wo] = bias[co] + sum_{kt,kh,kw,ci} w[co, ci, kt, kh, kw]
                           * xv[b, ci, to*st - front + kt*dt, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw]

GEMM rows are output positions ``(b, to, ho, wo)``, columns output channels, and the
reduction runs over taps ``(kt, kh, kw)`` then input channels (channels innermost; with
at most ``FLAT_K_MAX_C_IN`` input channels, e.g. RGB, over ``(tap, channel)`` flattened so
``K = 27 * 3`` is not padded to the tile width per tap). ``xv``
is read straight from ``x``: out-of-range rows/columns are masked to zero, frames before
the clip come from zeros, from the first frame (``replicate``, a clamped index) or from
``context``; frames after it from zeros or the last frame. No padded copy exists.

Backward (``mugv::causal_conv3d_bwd``):

* ``dx``: the transposed convolution, also an implicit GEMM, over input positions:
  ``dxv[b, ci, v, h, w] = sum dy[b, co, to, ho, wo] * w[co, ci, kt, kh, kw]`` over the taps
  with ``v + front - kt*dt = to*st`` (and likewise in space; non-divisible positions
  masked). The same kernel run over the padded frames gives ``dcontext``, and, folded
  onto the first/last frame, the replicate padding's share.
* ``dw``: ``dw[co, ci, tap] = sum_m dy[m, co] * xv[m + tap, ci]``, an implicit GEMM whose
  reduction runs over all output positions, split into fp32 partials (split-K) summed on
  the host. ``db``: a reduction of ``dy``.

A CUDA implementation of the forward (``csrc/conv3d.cu``, bf16/fp16, NDHWC) is the
``backend="cuda"`` of the same op; it is built as ``mugv_kernels._C`` when nvcc is found.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

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
from mugv_kernels._validate import FLOAT_DTYPES, check_dtype, check_tensor, memory_format_of, triple
from mugv_kernels.reference.conv3d import (
    PAD_MODES,
    TIME_PADDINGS,
    conv3d_bwd_ref,
    conv3d_out_size,
    conv3d_padded_ref,
    time_pads,
)

__all__ = ["BACKENDS", "causal_conv3d"]

BACKENDS = CSRC_BACKENDS  # the backend= values of causal_conv3d


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tap_rows(
    b, t_src, h_src, w_src, row_ok, T, H, W, P,
    sxb, sxt, sxh, sxw, scb, sct, sch, scw,
    HAS_CTX: tl.constexpr, REPLICATE: tl.constexpr,
):  # fmt: skip
    """Row offsets and masks of the virtual padded input at source coordinates
    ``(t_src, h_src, w_src)`` (``t_src`` in frames of ``x``; < 0 is the front padding).

    Returns ``(x_off, x_ok, c_off, c_ok)``: offsets into ``x`` and ``context`` and which
    rows read each (both false: a zero of the padding)."""
    sp_ok = row_ok & (h_src >= 0) & (h_src < H) & (w_src >= 0) & (w_src < W)
    if REPLICATE:
        t_x = tl.minimum(tl.maximum(t_src, 0), T - 1)
        x_ok = sp_ok
    else:
        t_x = t_src
        x_ok = sp_ok & (t_src >= 0) & (t_src < T)
    if HAS_CTX:
        c_ok = sp_ok & (t_src < 0) & (t_src >= -P)
        x_ok = x_ok & (t_src >= 0)
        c_off = b * scb + (t_src + P) * sct + h_src * sch + w_src * scw
    else:
        c_ok = row_ok & False
        c_off = b * 0
    x_off = b * sxb + t_x * sxt + h_src * sxh + w_src * sxw
    return x_off, x_ok, c_off, c_ok


@triton.jit
def _load_rows(X, CTX, x_off, x_ok, c_off, c_ok, chan, chan_ok, sxc, scc, HAS_CTX: tl.constexpr):
    """``[rows, channels]`` tile of the virtual padded input (native dtype)."""
    chan = chan.to(tl.int64)  # channel x channel stride passes 2^31 in a channels-first sample > 2^31
    a = tl.load(X + x_off[:, None] + chan[None, :] * sxc, mask=x_ok[:, None] & chan_ok[None, :], other=0.0)
    if HAS_CTX:
        cm = c_ok[:, None] & chan_ok[None, :]
        ac = tl.load(CTX + c_off[:, None] + chan[None, :] * scc, mask=cm, other=0.0)
        a = tl.where(cm, ac, a)
    return a


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr):
    """``acc += a @ b`` in fp32. UPCAST (fp32 inputs, or the interpreter, whose bf16
    arithmetic is wrong): exact fp32 products; else the tensor-core dot of bf16/fp16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _conv3d_fwd_kernel(
    X, CTX, WT, BIAS, Y,
    M, C_in, C_out, T, H, W, P, T_out, H_out, W_out,
    front, pad_h, pad_w, st, sh, sw, dt, dh, dw,
    sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
    syb, syc, syt, syh, syw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CTX: tl.constexpr, REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    FLAT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # WT: weight as [KT*KH*KW, C_in, C_out] contiguous (= [K, C_out]). Program: BLOCK_M output
    # positions x BLOCK_N output channels; reduction over taps, then input channels.
    # FLAT_K (few input channels, e.g. RGB pixels): one loop over k = (tap, ci) flattened,
    # each column of the A tile with its own tap, so K = 27 * 3 is not padded per tap.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    wo = rows % W_out
    r = rows // W_out
    ho = r % H_out
    r = r // H_out
    to = r % T_out
    b = r // T_out
    cout = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cout < C_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FLAT_K:
        for k0 in range(0, KT * KH * KW * C_in, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < KT * KH * KW * C_in
            tap = kk // C_in
            ci = (kk - tap * C_in).to(tl.int64)
            kt = tap // (KH * KW)
            kh = (tap // KW) % KH
            kw = tap % KW
            x_off, x_ok, c_off, c_ok = _tap_rows(
                b[:, None], (to * st - front)[:, None] + kt[None, :] * dt,
                (ho * sh - pad_h)[:, None] + kh[None, :] * dh, (wo * sw - pad_w)[:, None] + kw[None, :] * dw,
                row_ok[:, None] & k_ok[None, :],
                T, H, W, P, sxb, sxt, sxh, sxw, scb, sct, sch, scw, HAS_CTX, REPLICATE,
            )  # fmt: skip
            a = tl.load(X + x_off + ci[None, :] * sxc, mask=x_ok, other=0.0)
            if HAS_CTX:
                a = tl.where(c_ok, tl.load(CTX + c_off + ci[None, :] * scc, mask=c_ok, other=0.0), a)
            wt = tl.load(WT + kk[:, None] * C_out + cout[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(acc, a, wt, UPCAST)
    else:
        for tap in range(0, KT * KH * KW):
            kt = tap // (KH * KW)
            kh = (tap // KW) % KH
            kw = tap % KW
            x_off, x_ok, c_off, c_ok = _tap_rows(
                b, to * st - front + kt * dt, ho * sh - pad_h + kh * dh, wo * sw - pad_w + kw * dw, row_ok,
                T, H, W, P, sxb, sxt, sxh, sxw, scb, sct, sch, scw, HAS_CTX, REPLICATE,
            )  # fmt: skip
            w_base = WT + tap * C_in * C_out  # the weight has < 2^31 elements
            for c0 in range(0, C_in, BLOCK_K):
                ck = c0 + tl.arange(0, BLOCK_K)
                k_ok = ck < C_in
                a = _load_rows(X, CTX, x_off, x_ok, c_off, c_ok, ck, k_ok, sxc, scc, HAS_CTX)
                wt = tl.load(w_base + ck[:, None] * C_out + cout[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _mma(acc, a, wt, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + cout, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = b * syb + to * syt + ho * syh + wo * syw
    tl.store(
        Y + y_off[:, None] + cout.to(tl.int64)[None, :] * syc,
        acc.to(Y.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _conv3d_bwd_dx_kernel(
    DY, WT, DX,
    M, C_in, C_out, TV, v0, H, W, T_out, H_out, W_out,
    front, pad_h, pad_w, st, sh, sw, dt, dh, dw,
    sdb, sdc, sdt, sdh, sdw, sxb, sxc, sxt, sxh, sxw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Gradient of the virtual padded input at frames v0 .. v0+TV-1 (x coordinates), all
    # rows/columns of x. WT: weight as [KT*KH*KW, C_out, C_in]. Rows: (b, v, h, w);
    # columns: input channels; reduction over taps then output channels.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    w = rows % W
    r = rows // W
    h = r % H
    r = r // H
    tv = r % TV
    b = r // TV
    v = tv + v0
    cin = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cin < C_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(0, KT * KH * KW):
        kt = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        tn = v + front - kt * dt
        hn = h + pad_h - kh * dh
        wn = w + pad_w - kw * dw
        to = tn // st
        ho = hn // sh
        wo = wn // sw
        ok = row_ok & (tn >= 0) & (hn >= 0) & (wn >= 0)
        ok = ok & (tn - to * st == 0) & (hn - ho * sh == 0) & (wn - wo * sw == 0)
        ok = ok & (to < T_out) & (ho < H_out) & (wo < W_out)
        d_off = b * sdb + to * sdt + ho * sdh + wo * sdw
        w_base = WT + tap * C_out * C_in
        for c0 in range(0, C_out, BLOCK_K):
            ck = c0 + tl.arange(0, BLOCK_K)
            k_ok = ck < C_out
            g_off = d_off[:, None] + ck.to(tl.int64)[None, :] * sdc
            g = tl.load(DY + g_off, mask=ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_base + ck[:, None] * C_in + cin[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(acc, g, wt, UPCAST)
    x_off = b * sxb + tv * sxt + h * sxh + w * sxw
    tl.store(
        DX + x_off[:, None] + cin.to(tl.int64)[None, :] * sxc,
        acc.to(DX.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _conv3d_bwd_dw_kernel(
    X, CTX, DY, DW_P,
    M, m_per_split, C_in, C_out, T, H, W, P, T_out, H_out, W_out,
    front, pad_h, pad_w, st, sh, sw, dt, dh, dw,
    sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, sdb, sdc, sdt, sdh, sdw,
    n_co_blocks, n_ci_blocks,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_CTX: tl.constexpr, REPLICATE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (tap, co block, ci block) x split: dw_p[split, tap, co, ci] = sum over the
    # split's output positions m of dy[m, co] * xv[m shifted by tap, ci].
    pid = tl.program_id(0)
    split = tl.program_id(1)
    ci_blk = pid % n_ci_blocks
    r = pid // n_ci_blocks
    co_blk = r % n_co_blocks
    tap = r // n_co_blocks
    kt = tap // (KH * KW)
    kh = (tap // KW) % KH
    kw = tap % KW
    co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_out
    ci = ci_blk * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C_in
    m_start = split.to(tl.int64) * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_K):
        rows = m0 + tl.arange(0, BLOCK_K).to(tl.int64)  # int64 even where m0 is a Python int (interpreter)
        row_ok = rows < m_end
        wo = rows % W_out
        r2 = rows // W_out
        ho = r2 % H_out
        r2 = r2 // H_out
        to = r2 % T_out
        b = r2 // T_out
        d_off = b * sdb + to * sdt + ho * sdh + wo * sdw
        g_off = co.to(tl.int64)[:, None] * sdc + d_off[None, :]
        g = tl.load(DY + g_off, mask=co_ok[:, None] & row_ok[None, :], other=0.0)
        x_off, x_ok, c_off, c_ok = _tap_rows(
            b, to * st - front + kt * dt, ho * sh - pad_h + kh * dh, wo * sw - pad_w + kw * dw, row_ok,
            T, H, W, P, sxb, sxt, sxh, sxw, scb, sct, sch, scw, HAS_CTX, REPLICATE,
        )  # fmt: skip
        a = _load_rows(X, CTX, x_off, x_ok, c_off, c_ok, ci, ci_ok, sxc, scc, HAS_CTX)
        acc = _mma(acc, g, a, UPCAST)
    p_off = ((split.to(tl.int64) * (KT * KH * KW) + tap) * C_out + co[:, None]) * C_in + ci[None, :]
    tl.store(DW_P + p_off, acc, mask=co_ok[:, None] & ci_ok[None, :])


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of one implicit-GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


FLAT_K_MAX_C_IN = 8
"""Forward convolutions with at most this many input channels reduce over (tap, channel)
flattened (no per-tap padding of K to the tile width)."""

SMALL_TILES: bool = INTERPRET
"""Interpreter tiles (the smallest that cover the problem). Tests set it to False to run
the GPU tile shapes (multiple M/N blocks, K loops, split-K) through the interpreter."""


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype) -> GemmConfig:
    """Tiles for rows ``M``, columns ``N`` (output channels) and per-tap reduction ``K``
    (input channels). GPU: 128 x up-to-128 tiles, K steps of 64 (bf16/fp16) or 32 (fp32),
    three stages. Interpreter: the smallest tiles that cover the problem (each program
    runs in Python)."""
    pow2 = triton.next_power_of_2
    if SMALL_TILES:
        return GemmConfig(
            min(max(pow2(M), 16), 256), min(max(pow2(N), 16), 64), min(max(pow2(K), 16), 256), 4, 1
        )
    wide = dtype != torch.float32
    block_k = min(max(pow2(K), 16), 64 if wide else 32)
    block_n = min(max(pow2(N), 16), 128 if wide else 64)
    block_m = 128 if wide else 64
    return GemmConfig(block_m, block_n, block_k, 8 if wide else 4, 3 if wide else 2)


def _strides5(t: Tensor | None) -> tuple[int, int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0, 0)


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


def _out_sizes(x: Tensor, weight: Tensor, stride, dilation, front: int, back: int) -> tuple[int, int, int]:
    _, _, T, H, W = x.shape
    _, _, kT, kH, kW = weight.shape
    ph, pw = dilation[1] * (kH // 2), dilation[2] * (kW // 2)
    return (
        conv3d_out_size(T, front, back, kT, stride[0], dilation[0]),
        conv3d_out_size(H, ph, ph, kH, stride[1], dilation[1]),
        conv3d_out_size(W, pw, pw, kW, stride[2], dilation[2]),
    )


def _conv3d_fwd_launch(x, context, weight, bias, stride, dilation, front, back, replicate):
    B, C_in, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight.shape
    T_out, H_out, W_out = _out_sizes(x, weight, stride, dilation, front, back)
    y = torch.empty((B, C_out, T_out, H_out, W_out), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    M = B * T_out * H_out * W_out
    if M == 0 or C_out == 0:
        return y
    wt = weight.permute(2, 3, 4, 1, 0).reshape(kT * kH * kW, C_in, C_out).to(x.dtype).contiguous()
    flat = C_in <= FLAT_K_MAX_C_IN
    cfg = gemm_config(M, C_out, kT * kH * kW * C_in if flat else C_in, x.dtype)
    if flat and not SMALL_TILES:  # 2-D index math per A element: 32-wide K steps (64 spill)
        cfg = GemmConfig(cfg.block_m, cfg.block_n, min(cfg.block_k, 32), cfg.num_warps, cfg.num_stages)
    P = context.shape[2] if context is not None else 0
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(C_out, cfg.block_n))
    launch(_conv3d_fwd_kernel, grid)(
        x, context if context is not None else x, wt, bias if bias is not None else wt, y,
        M, C_in, C_out, T, H, W, P, T_out, H_out, W_out,
        front, dilation[1] * (kH // 2), dilation[2] * (kW // 2), *stride, *dilation,
        *_strides5(x), *_strides5(context), *_strides5(y),
        KT=kT, KH=kH, KW=kW, HAS_CTX=context is not None, REPLICATE=replicate,
        HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), FLAT_K=flat,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def _dx_launch(dy, wt, out, v0, n_frames, x_shape, stride, dilation, front, kernel_size):
    """Gradient of the virtual padded input at frames ``v0 .. v0 + n_frames - 1`` into
    ``out [B, C_in, n_frames, H, W]`` (any strides)."""
    B, C_in, _, H, W = x_shape
    kT, kH, kW = kernel_size
    C_out, T_out, H_out, W_out = dy.shape[1], dy.shape[2], dy.shape[3], dy.shape[4]
    M = B * n_frames * H * W
    if M == 0 or C_in == 0:
        return
    cfg = gemm_config(M, C_in, C_out, dy.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(C_in, cfg.block_n))
    launch(_conv3d_bwd_dx_kernel, grid)(
        dy, wt, out,
        M, C_in, C_out, n_frames, v0, H, W, T_out, H_out, W_out,
        front, dilation[1] * (kH // 2), dilation[2] * (kW // 2), *stride, *dilation,
        *_strides5(dy), *_strides5(out),
        KT=kT, KH=kH, KW=kW, UPCAST=_upcast(dy.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def dw_splits(M: int, n_tiles: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """``(splits, m_per_split)`` of the dw reduction over ``M`` output positions: about
    four programs per SM on CUDA (one with the interpreter's small tiles, four with GPU
    tiles on CPU), each at least 8 K-steps."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 1 if SMALL_TILES else 4
    splits = max(1, min(triton.cdiv(target, max(n_tiles, 1)), triton.cdiv(M, 8 * block_k)))
    m_per_split = triton.cdiv(triton.cdiv(M, splits), block_k) * block_k
    return triton.cdiv(M, m_per_split), m_per_split


def _dw_launch(dy, x, context, weight_shape, stride, dilation, front, replicate):
    B, C_in, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight_shape
    T_out, H_out, W_out = dy.shape[2:]
    M = B * T_out * H_out * W_out
    taps = kT * kH * kW
    # tiles: [C_out block, C_in block] per program, K steps over output positions. Both
    # operands are gathered through 2-D int64 pointer tiles, so on GPU the tiles stay at
    # 64 x 64 x 32 with two stages (128-row tiles or 64-wide K steps spill on sm_90a).
    cfg = gemm_config(C_out, C_in, M, dy.dtype)
    block_co = min(max(triton.next_power_of_2(C_out), 16), 64)
    block_ci = min(max(triton.next_power_of_2(C_in), 16), 64)
    block_k = cfg.block_k if SMALL_TILES else 32
    cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, 4 if SMALL_TILES else 8, 1 if SMALL_TILES else 2)
    n_co, n_ci = triton.cdiv(C_out, block_co), triton.cdiv(C_in, block_ci)
    splits, m_per_split = dw_splits(M, taps * n_co * n_ci, block_k, x.device) if M > 0 else (1, 1)
    dw_p = torch.zeros((splits, taps, C_out, C_in), dtype=torch.float32, device=x.device)
    if M > 0 and C_in > 0 and C_out > 0:
        P = context.shape[2] if context is not None else 0
        launch(_conv3d_bwd_dw_kernel, (taps * n_co * n_ci, splits))(
            x, context if context is not None else x, dy, dw_p,
            M, m_per_split, C_in, C_out, T, H, W, P, T_out, H_out, W_out,
            front, dilation[1] * (kH // 2), dilation[2] * (kW // 2), *stride, *dilation,
            *_strides5(x), *_strides5(context), *_strides5(dy), n_co, n_ci,
            KT=kT, KH=kH, KW=kW, HAS_CTX=context is not None, REPLICATE=replicate,
            UPCAST=_upcast(x.dtype), BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_K=block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dw_p.sum(0).reshape(kT, kH, kW, C_out, C_in).permute(3, 4, 0, 1, 2)


def _conv3d_bwd_launch(dy, x, context, weight, stride, dilation, front, back, replicate, need):
    need_dx, need_dctx, need_dw, need_db = need
    B, C_in, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight.shape
    dx, dctx, dw, db = (x.new_empty(0) for _ in range(4))  # distinct: outputs must not alias
    if need_dx or need_dctx:
        wt = weight.permute(2, 3, 4, 0, 1).reshape(kT * kH * kW, C_out, C_in).to(dy.dtype).contiguous()
        ks = (kT, kH, kW)
    if need_dx:
        dx = torch.empty_like(x, memory_format=memory_format_of(x))
        _dx_launch(dy, wt, dx, 0, T, x.shape, stride, dilation, front, ks)
        if replicate and T > 0:
            # frames of the padding that copy x[:, :, 0] / x[:, :, -1]: their gradient folds
            # onto those frames (fp32 buffers of front/back frames only).
            n_front = 0 if context is not None else max(front, 0)
            n_back = max(back, 0)
            for v0, n, t in ((-n_front, n_front, 0), (T, n_back, T - 1)):
                if n == 0:
                    continue
                buf = torch.empty((B, C_in, n, H, W), dtype=torch.float32, device=x.device)
                _dx_launch(dy, wt, buf, v0, n, x.shape, stride, dilation, front, ks)
                dx[:, :, t] = (dx[:, :, t].float() + buf.sum(2)).to(dx.dtype)
    if need_dctx and context is not None:
        dctx = torch.empty_like(context, memory_format=memory_format_of(context))
        _dx_launch(dy, wt, dctx, -context.shape[2], context.shape[2], x.shape, stride, dilation, front, ks)
    if need_dw:
        dw = torch.empty_like(weight).copy_(_dw_launch(dy, x, context, weight.shape, stride, dilation, front, replicate))
    if need_db:
        db = torch.sum(dy, dim=(0, 2, 3, 4), dtype=torch.float32).to(weight.dtype)
    return dx, dctx, dw, db


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------


def _conv3d_fwd_fake(x, context, weight, bias, stride, dilation, front, back, replicate):
    B, C_out = x.shape[0], weight.shape[0]
    T_out, H_out, W_out = _out_sizes(x, weight, stride, dilation, front, back)
    return torch.empty(
        (B, C_out, T_out, H_out, W_out), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x)
    )


@mugv_op("causal_conv3d_fwd", fake=_conv3d_fwd_fake)
def _conv3d_fwd(
    x: Tensor,
    context: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    dilation: list[int],
    front: int,
    back: int,
    replicate: bool,
) -> Tensor:
    """``mugv::causal_conv3d_fwd``: the convolution of the padded input (Triton)."""
    if use_triton(x):
        return _conv3d_fwd_launch(x, context, weight, bias, stride, dilation, front, back, replicate)
    return conv3d_padded_ref(x, context, weight, bias, stride, dilation, front, back, replicate)


def cuda_weight_layout(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight as ``csrc/conv3d.cu`` reads it: ``[C_out, kT, kH, kW, C_in]`` contiguous,
    in ``dtype`` (the input's), from ``weight [C_out, C_in, kT, kH, kW]``."""
    return weight.detach().to(dtype).permute(0, 2, 3, 4, 1).contiguous()


class WeightLayoutCache:
    """One re-laid-out copy per live weight tensor, rebuilt when the weight changes.

    An entry is reused only for the same tensor object (held by a weak reference, so a
    freed weight whose memory is reused never hits a stale entry) whose version counter
    (``weight._version``: every in-place write, e.g. an optimizer step, bumps it),
    ``data_ptr``, shape, strides, dtype and device are unchanged, and for the same target
    dtype. An entry is dropped when its weight is freed. Inference tensors (which have
    no version counter) are re-laid out on every call.

    Args:
        layout: ``(weight, dtype) -> Tensor``, the re-layout to cache.
    """

    def __init__(self, layout):
        self._layout = layout
        self._entries: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(weight: Tensor, dtype: torch.dtype) -> tuple:
        return (weight._version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, dtype)

    def get(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``layout(weight, dtype)``, from the cache when the weight has not changed."""
        if weight.is_inference():
            return self._layout(weight, dtype)
        key = self._key(weight, dtype)
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0]() is weight and entry[1] == key:
            return entry[2]
        out = self._layout(weight, dtype)
        entries, wid = self._entries, id(weight)

        def drop(ref: weakref.ref) -> None:
            if entries.get(wid, (None,))[0] is ref:
                del entries[wid]

        self._entries[wid] = (weakref.ref(weight, drop), key, out)
        return out


CUDA_WEIGHTS = WeightLayoutCache(cuda_weight_layout)
"""The conv weights of the ``"cuda"`` backend, re-laid out once per weight version."""


@torch.library.custom_op("mugv::causal_conv3d_fwd_cuda", mutates_args=())
def _conv3d_fwd_cuda(
    x: Tensor,
    context: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    dilation: list[int],
    front: int,
    back: int,
    replicate: bool,
) -> Tensor:
    """``mugv::causal_conv3d_fwd_cuda``: the forward by ``csrc/conv3d.cu`` (NDHWC bf16/fp16)."""
    ext = cuda_extension()
    B, C_in, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight.shape
    T_out, H_out, W_out = _out_sizes(x, weight, stride, dilation, front, back)
    fmt = memory_format_of(x)
    y = torch.empty((B, C_out, T_out, H_out, W_out), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    if y.numel() == 0:
        return y.contiguous(memory_format=fmt)
    xc = x.contiguous(memory_format=torch.channels_last_3d)
    cc = context.contiguous(memory_format=torch.channels_last_3d) if context is not None else None
    w = CUDA_WEIGHTS.get(weight, x.dtype)  # [C_out, kT, kH, kW, C_in], re-laid out once per weight version
    bc = bias.to(torch.float32).contiguous() if bias is not None else None
    ext.causal_conv3d_fwd(
        xc.data_ptr(), cc.data_ptr() if cc is not None else 0, w.data_ptr(), bc.data_ptr() if bc is not None else 0,
        y.data_ptr(), 1 if x.dtype == torch.bfloat16 else 0,
        B, C_in, T, H, W, C_out, kT, kH, kW, *stride, *dilation,
        front, dilation[1] * (kH // 2), dilation[2] * (kW // 2), T_out, H_out, W_out,
        cc.shape[2] if cc is not None else 0, bool(replicate), torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip
    return y.contiguous(memory_format=fmt)


_conv3d_fwd_cuda.register_fake(_conv3d_fwd_fake)


def _conv3d_bwd_fake(dy, x, context, weight, stride, dilation, front, back, replicate, need):
    dx = torch.empty_like(x, memory_format=memory_format_of(x)) if need[0] else x.new_empty(0)
    dctx = torch.empty_like(context, memory_format=memory_format_of(context)) if need[1] and context is not None else x.new_empty(0)
    dw = torch.empty_like(weight) if need[2] else x.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if need[3] else x.new_empty(0)
    return dx, dctx, dw, db


@mugv_op("causal_conv3d_bwd", fake=_conv3d_bwd_fake)
def _conv3d_bwd(
    dy: Tensor,
    x: Tensor,
    context: Tensor | None,
    weight: Tensor,
    stride: list[int],
    dilation: list[int],
    front: int,
    back: int,
    replicate: bool,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mugv::causal_conv3d_bwd``: ``(dx, dcontext, dweight, dbias)``; each is empty when
    its flag in ``need`` (same order) is False."""
    if use_triton(x):
        return _conv3d_bwd_launch(dy, x, context, weight, stride, dilation, front, back, replicate, need)
    dx, dctx, dw, db = conv3d_bwd_ref(dy, x, context, weight, need[3], stride, dilation, front, back, replicate)
    # fresh outputs with the fake implementation's layouts
    dx_out, dctx_out, dw_out, db_out = _conv3d_bwd_fake(dy, x, context, weight, stride, dilation, front, back, replicate, need)
    return (
        dx_out.copy_(dx) if need[0] else dx_out,
        dctx_out.copy_(dctx) if need[1] and dctx is not None else dctx_out,
        dw_out.copy_(dw) if need[2] else dw_out,
        db_out.copy_(db) if need[3] and db is not None else db_out,
    )


def _conv3d_setup_context(ctx, inputs, output):
    x, context, weight, bias, stride, dilation, front, back, replicate = inputs
    ctx.save_for_backward(x, context, weight)
    ctx.args = (list(stride), list(dilation), front, back, replicate)
    ctx.has_bias = bias is not None


def _conv3d_backward(ctx, dy):
    x, context, weight = ctx.saved_tensors
    need = [
        bool(ctx.needs_input_grad[0]),
        bool(ctx.needs_input_grad[1]) and context is not None,
        bool(ctx.needs_input_grad[2]),
        bool(ctx.needs_input_grad[3]) and ctx.has_bias,
    ]
    stride, dilation, front, back, replicate = ctx.args
    dx, dctx, dw, db = torch.ops.mugv.causal_conv3d_bwd(
        dy=dy, x=x, context=context, weight=weight, stride=stride, dilation=dilation,
        front=front, back=back, replicate=replicate, need=need,
    )  # fmt: skip
    return (
        dx if need[0] else None, dctx if need[1] else None, dw if need[2] else None, db if need[3] else None,
        None, None, None, None, None,
    )  # fmt: skip


_conv3d_fwd.register_autograd(_conv3d_backward, setup_context=_conv3d_setup_context)
_conv3d_fwd_cuda.register_autograd(_conv3d_backward, setup_context=_conv3d_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def causal_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, int, int] = (1, 1, 1),
    dilation: int | tuple[int, int, int] = (1, 1, 1),
    time_padding: str = "causal",
    pad_mode: str = "zeros",
    context: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """3D convolution with causal (or MUG-V symmetric) time padding and fused zero
    spatial padding: ``F.conv3d(pad(x), weight, bias, stride, dilation=dilation)``
    without the padded copy.

    Padding (Open-Sora / MUG-V ``CausalConv3d``; causal rule of MAGVIT-v2, arXiv
    2310.05737 Sec. 3.1):

    * space: zeros, ``dilation_h * (kH // 2)`` and ``dilation_w * (kW // 2)`` on each side
      (``kH // 2, kW // 2`` at the usual dilation 1);
    * ``time_padding="causal"``: ``P = dilation_t * (kT - 1)`` frames before the clip
      (zeros, or copies of the first frame with ``pad_mode="replicate"``; the frames of
      ``context`` when given), none after: output frame ``t`` depends on input frames
      ``<= t * stride_t`` only, so encoding a video chunk by chunk, each chunk with the
      last ``P`` frames before it as ``context``, equals one pass (chunk lengths multiples
      of ``stride_t``; see :class:`mugv_kernels.nn.CausalConv3d`);
    * ``time_padding="symmetric"``: the public MUG-V rule (not causal),
      ``total = dilation_t * (kT - 1) + 1 - stride_t`` frames split ``total // 2`` before
      and the rest after (zeros or edge-frame copies; negative amounts crop).

    Args:
        x: ``[B, C_in, T, H, W]`` fp32/bf16/fp16 (fp64 runs the reference), contiguous,
            ``channels_last_3d`` or any strides.
        weight: ``[C_out, C_in, kT, kH, kW]`` with odd ``kH``, ``kW``; any float dtype
            (cast to ``x.dtype`` for the products).
        bias: ``[C_out]`` or None.
        stride: ``(t, h, w)`` or one int, positive (default 1).
        dilation: ``(t, h, w)`` or one int, positive (default 1).
        time_padding: ``"causal"`` (default) or ``"symmetric"``.
        pad_mode: ``"zeros"`` (default) or ``"replicate"`` (time padding only).
        context: ``[B, C_in, P, H, W]`` with ``P = dilation_t * (kT - 1)``: the frames
            preceding ``x``, used instead of the causal front padding (``"causal"`` only).
            Differentiable.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            PyTorch reference), ``"triton"``, ``"cuda"`` (the ``csrc`` forward, bf16/fp16,
            CUDA tensors; its backward runs the Triton kernels) or ``"reference"``
            (explicit padding + ``F.conv3d``).

    Returns:
        ``[B, C_out, T_out, H_out, W_out]`` in ``x.dtype`` with ``x``'s memory format
        (``channels_last_3d`` in, ``channels_last_3d`` out); accumulation in fp32.
        ``H_out = (H - 1) // stride_h + 1`` (same for W); causal
        ``T_out = (T - 1) // stride_t + 1``; ``T = 0`` gives an empty result.

    Raises:
        TypeError: a non-tensor; an unsupported dtype; context dtype different from x;
            stride/dilation not ints; ``backend="cuda"`` with a dtype it lacks.
        ValueError: wrong rank; even ``kH``/``kW``; ``C_in`` mismatch between x, weight
            and context; bias not ``[C_out]``; non-positive stride or dilation, or not
            three of them; unknown ``time_padding``/``pad_mode``/``backend`` (or one that
            cannot run here); context of the wrong shape, or with ``"symmetric"``; mixed
            devices.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("context", context)):
        check_dtype(name, t, FLOAT_DTYPES)
    check_tensor("x", x, ndim=5)
    dev = x.device
    check_tensor("weight", weight, ndim=5, device=dev)
    stride, dilation = triple("stride", stride), triple("dilation", dilation)
    if time_padding not in TIME_PADDINGS:
        raise ValueError(f"time_padding must be one of {TIME_PADDINGS}, got {time_padding!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    B, C_in, T, H, W = x.shape
    C_out, wc, kT, kH, kW = weight.shape
    if wc != C_in:
        raise ValueError(f"weight must have C_in={C_in} input channels (from x), got shape {tuple(weight.shape)}")
    if min(kT, kH, kW) < 1:
        raise ValueError(f"weight kernel size must be positive, got {(kT, kH, kW)}")
    if kH % 2 == 0 or kW % 2 == 0:
        raise ValueError(f"spatial kernel sizes must be odd (same-size zero padding), got kH={kH}, kW={kW}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=dev)
        if bias.shape[0] != C_out:
            raise ValueError(f"bias must have shape ({C_out},), got {tuple(bias.shape)}")
    front, back = time_pads(kT, stride[0], dilation[0], time_padding)
    if context is not None:
        if time_padding != "causal":
            raise ValueError("context needs time_padding='causal' (it replaces the causal front padding)")
        check_tensor("context", context, ndim=5, device=dev)
        want = (B, C_in, front, H, W)
        if tuple(context.shape) != want:
            raise ValueError(
                f"context must have shape {want} (B, C_in, P = dilation_t*(kT-1), H, W), got {tuple(context.shape)}"
            )
        if context.dtype != x.dtype:
            raise TypeError(f"context dtype {context.dtype} != x dtype {x.dtype}")
        if front == 0:
            context = None
    backend = check_backend(backend, x, choices=BACKENDS)
    if backend == "reference":
        return conv3d_padded_ref(x, context, weight, bias, stride, dilation, front, back, pad_mode == "replicate")
    op = torch.ops.mugv.causal_conv3d_fwd_cuda if backend == "cuda" else torch.ops.mugv.causal_conv3d_fwd
    return op(
        x=x, context=context, weight=weight, bias=bias, stride=list(stride), dilation=list(dilation),
        front=front, back=back, replicate=pad_mode == "replicate",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile cases: the launches the ops make at the benchmark shapes
# ----------------------------------------------------------------------------------------


@register_aot_cases("conv3d")
def _aot_cases() -> None:
    """MUG-V temporal VAE at 720p (bf16): the 512-channel stage at 90x160 in 48 frames
    down to 128 channels, the 256/128-channel stages at higher resolution, a (3,1,1)
    temporal conv and a time-strided conv; and a full-3D VAE's first stage on pixels,
    ``[1, 3, 17, 720, 1280] -> 128``. Forward, dx and dw, NCDHW and channels-last."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    cases = [
        # (B, C_in, T, H, W), C_out, kernel, stride, channels_last, replicate
        ((1, 512, 48, 90, 160), 128, (3, 3, 3), (1, 1, 1), False, False),
        ((1, 512, 48, 90, 160), 512, (3, 3, 3), (1, 1, 1), True, False),
        ((1, 256, 24, 180, 320), 256, (3, 3, 3), (1, 1, 1), True, True),
        ((1, 128, 12, 360, 640), 128, (3, 3, 3), (1, 1, 1), True, False),
        ((1, 512, 48, 90, 160), 512, (3, 1, 1), (2, 1, 1), True, False),
        ((1, 3, 17, 720, 1280), 128, (3, 3, 3), (1, 1, 1), False, False),
    ]
    for shape, C_out, k, stride, cl, rep in cases:
        x = torch.empty(shape, **meta)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        w = torch.empty(C_out, shape[1], *k, **meta)
        bias = torch.empty(C_out, **meta)
        front, back = time_pads(k[0], stride[0], 1, "causal")
        y = _conv3d_fwd_launch(x, None, w, bias, stride, (1, 1, 1), front, back, rep)
        _conv3d_bwd_launch(y, x, None, w, stride, (1, 1, 1), front, back, rep, (True, False, True, True))
