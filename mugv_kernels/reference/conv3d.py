"""Reference math of the causal 3D convolution (the video VAE's convolution).

Causal 3D convolution (Open-Sora / MUG-V ``CausalConv3d``, public code
``mug_v/vae/...causal_conv3d``; the causal time padding of MAGVIT-v2, arXiv 2310.05737
Sec. 3.1) is an ordinary ``F.conv3d`` on an input padded in time and space:

* space: zeros, ``dilation_h * (kH // 2)`` rows and ``dilation_w * (kW // 2)`` columns on
  each side (odd kH, kW: "same" size at stride 1);
* time, ``time_padding="causal"``: ``P = dilation_t * (kT - 1)`` frames before the clip
  and none after, so output frame ``t`` only sees input frames ``<= t * stride_t``;
  the frames are zeros, copies of the first frame (``pad_mode="replicate"``), or the
  ``P`` real frames that precede the clip (``context``, for chunked encoding);
* time, ``time_padding="symmetric"``: the public MUG-V rule, which is not causal:
  ``total = dilation_t * (kT - 1) + 1 - stride_t`` split as ``total // 2`` before and
  the rest after (a negative amount crops frames, as ``F.pad`` does).

These functions are the definition of "correct" for the tests and benchmarks and the
path the ops run on plain CPU tensors and in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mugv_kernels._validate import memory_format_of

__all__ = [
    "causal_conv3d_ref",
    "conv3d_bwd_ref",
    "conv3d_out_size",
    "conv3d_padded_ref",
    "time_pads",
]

TIME_PADDINGS = ("causal", "symmetric")
PAD_MODES = ("zeros", "replicate")


def time_pads(kT: int, stride_t: int, dilation_t: int, time_padding: str) -> tuple[int, int]:
    """``(front, back)`` frames of time padding (negative: frames cropped).

    ``"causal"``: ``(dilation_t * (kT - 1), 0)``. ``"symmetric"`` (public MUG-V):
    ``total = dilation_t * (kT - 1) + 1 - stride_t``, ``(total // 2, total - total // 2)``.
    """
    if time_padding == "causal":
        return dilation_t * (kT - 1), 0
    total = dilation_t * (kT - 1) + 1 - stride_t
    return total // 2, total - total // 2


def conv3d_out_size(n: int, pad_lo: int, pad_hi: int, k: int, stride: int, dilation: int) -> int:
    """Output length of a convolution over ``n + pad_lo + pad_hi`` positions (0 when the
    padded input is shorter than the dilated kernel)."""
    span = n + pad_lo + pad_hi - dilation * (k - 1) - 1
    return span // stride + 1 if span >= 0 else 0


def _pad_time(x: Tensor, front: int, back: int, replicate: bool, context: Tensor | None) -> Tensor:
    """``x [B, C, T, H, W]`` padded (or cropped) in time: an explicit copy."""
    T = x.shape[2]
    parts = []
    if front < 0:
        x = x[:, :, -front:]
    elif front > 0:
        if context is not None:
            parts.append(context.to(x.dtype))
        elif replicate and T > 0:
            parts.append(x[:, :, :1].expand(-1, -1, front, -1, -1))
        else:
            parts.append(x.new_zeros(x.shape[0], x.shape[1], front, *x.shape[3:]))
    parts.append(x)
    if back < 0:
        parts[-1] = x[:, :, : max(x.shape[2] + back, 0)]
    elif back > 0:
        if replicate and T > 0:
            parts.append(x[:, :, -1:].expand(-1, -1, back, -1, -1))
        else:
            parts.append(x.new_zeros(x.shape[0], x.shape[1], back, *x.shape[3:]))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def conv3d_padded_ref(
    x: Tensor,
    context: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int, int] | list[int],
    dilation: tuple[int, int, int] | list[int],
    front: int,
    back: int,
    replicate: bool,
) -> Tensor:
    """The convolution as the ops define it, from explicit padding amounts.

    Args:
        x: ``[B, C_in, T, H, W]``; context: ``[B, C_in, front, H, W]`` or None.
        weight: ``[C_out, C_in, kT, kH, kW]``; bias: ``[C_out]`` or None.
        stride, dilation: ``(t, h, w)``.
        front, back: time padding before/after (negative crops), as :func:`time_pads`.
        replicate: time padding copies the edge frames instead of zeros.

    Returns:
        ``[B, C_out, T_out, H_out, W_out]`` in ``x.dtype`` and ``x``'s memory format.
        Differentiable (this is ``F.pad``-style padding + ``F.conv3d``).
    """
    B, _, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight.shape
    ph, pw = dilation[1] * (kH // 2), dilation[2] * (kW // 2)
    T_out = conv3d_out_size(T, front, back, kT, stride[0], dilation[0])
    fmt = memory_format_of(x)
    if T_out == 0 or B == 0:
        H_out = conv3d_out_size(H, ph, ph, kH, stride[1], dilation[1])
        W_out = conv3d_out_size(W, pw, pw, kW, stride[2], dilation[2])
        return x.new_zeros((B, C_out, T_out, H_out, W_out)).contiguous(memory_format=fmt)
    xp = _pad_time(x, front, back, replicate, context)
    xp = F.pad(xp, (pw, pw, ph, ph, 0, 0))
    y = F.conv3d(xp, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None, stride=tuple(stride), dilation=tuple(dilation))
    return y.contiguous(memory_format=fmt)


def causal_conv3d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: tuple[int, int, int] = (1, 1, 1),
    dilation: tuple[int, int, int] = (1, 1, 1),
    time_padding: str = "causal",
    pad_mode: str = "zeros",
    context: Tensor | None = None,
) -> Tensor:
    """:func:`mugv_kernels.causal_conv3d` as explicit padding + ``F.conv3d`` (same
    arguments; see the module docstring for the padding rules)."""
    kT = weight.shape[2]
    front, back = time_pads(kT, stride[0], dilation[0], time_padding)
    return conv3d_padded_ref(x, context, weight, bias, stride, dilation, front, back, pad_mode == "replicate")


def conv3d_bwd_ref(
    dy: Tensor,
    x: Tensor,
    context: Tensor | None,
    weight: Tensor,
    has_bias: bool,
    stride,
    dilation,
    front: int,
    back: int,
    replicate: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(dx, dcontext, dweight, dbias)`` of :func:`conv3d_padded_ref` (dcontext None
    without context, dbias None without bias).

    ``aten.convolution_backward`` on the explicitly padded input, then the padding's
    gradient is undone: spatial borders dropped; front frames -> ``dcontext``, or summed
    onto frame 0 (replicate), or dropped (zeros); back frames likewise onto frame T-1.
    Explicit (no autograd), so it also runs inside the custom op's backward.
    """
    B, C_in, T, H, W = x.shape
    C_out, _, kT, kH, kW = weight.shape
    ph, pw = dilation[1] * (kH // 2), dilation[2] * (kW // 2)
    dx = torch.zeros_like(x)
    dctx = torch.zeros_like(context) if context is not None else None
    db = torch.sum(dy, dim=(0, 2, 3, 4), dtype=torch.float32 if dy.dtype != torch.float64 else dy.dtype)
    db = db.to(weight.dtype) if has_bias else None
    if dy.numel() == 0:
        return dx, dctx, torch.zeros_like(weight), db
    xp = F.pad(_pad_time(x, front, back, replicate, context), (pw, pw, ph, ph, 0, 0))
    dxp, dw, _ = torch.ops.aten.convolution_backward(
        dy.to(x.dtype), xp, weight.to(x.dtype), None, list(stride), [0, 0, 0], list(dilation),
        False, [0, 0, 0], 1, [True, True, False],
    )  # fmt: skip
    dxp = dxp[:, :, :, ph : ph + H, pw : pw + W]
    n_front, n_back = max(front, 0), max(back, 0)
    x_lo, x_hi = max(-front, 0), T - max(-back, 0)
    if x_hi > x_lo:
        dx[:, :, x_lo:x_hi] = dxp[:, :, n_front : n_front + x_hi - x_lo]
    if n_front:
        if context is not None:
            dctx = dxp[:, :, :n_front].to(context.dtype)
        elif replicate:
            dx[:, :, 0] += dxp[:, :, :n_front].sum(2)
    if n_back and replicate:
        dx[:, :, T - 1] += dxp[:, :, dxp.shape[2] - n_back :].sum(2)
    return dx, dctx, dw.to(weight.dtype), db
