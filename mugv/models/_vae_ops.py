"""The two ops the video VAE is built from, behind one small adapter.

* :func:`causal_conv3d` -- a 3D convolution padded in time (causal, or the public MUG-V
  "symmetric" rule) and zero padded ``k // 2`` in space; optionally fed the real frames
  that precede the input (``context``) in place of the front padding, which is how the
  VAE streams a clip chunk by chunk.
* :func:`group_norm_silu` -- ``silu(group_norm(x))`` (or the norm alone).

With ``kernels=True`` they call :func:`mugv_kernels.causal_conv3d` and
:func:`mugv_kernels.group_norm_silu` when the installed ``mugv_kernels`` provides them (the
fused Triton kernels on CUDA, the PyTorch reference elsewhere); otherwise, and with
``kernels=False``, they run the plain-PyTorch definition below (``F.pad`` + ``F.conv3d``,
``F.group_norm`` + ``F.silu``), which is the math the kernels implement (MAGVIT-v2 causal
padding, arXiv 2310.05737 Sec. 3.1; public MUG-V ``CausalConv3d`` in
``mug_v/encoder/vae/vae_temporal.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the kernel library is a hard dependency, the two VAE ops may not be in it yet
    import mugv_kernels as _mk
except ImportError:  # pragma: no cover - mugv_kernels ships with mugv
    _mk = None

__all__ = ["causal_conv3d", "conv_out_len", "group_norm_silu", "has_kernel_ops", "time_pads"]

TIME_PADDINGS = ("causal", "symmetric")


def has_kernel_ops() -> bool:
    """Whether ``mugv_kernels`` exports both ``causal_conv3d`` and ``group_norm_silu``."""
    return _mk is not None and hasattr(_mk, "causal_conv3d") and hasattr(_mk, "group_norm_silu")


def time_pads(kT: int, stride_t: int, dilation_t: int, time_padding: str) -> tuple[int, int]:
    """``(front, back)`` frames of time padding.

    ``"causal"``: ``(dilation_t * (kT - 1), 0)``. ``"symmetric"`` (public MUG-V
    ``CausalConv3d``): ``total = dilation_t * (kT - 1) + 1 - stride_t`` split as
    ``(total // 2, total - total // 2)``.

    Raises:
        ValueError: unknown ``time_padding``.
    """
    if time_padding == "causal":
        return dilation_t * (kT - 1), 0
    if time_padding == "symmetric":
        total = dilation_t * (kT - 1) + 1 - stride_t
        return total // 2, total - total // 2
    raise ValueError(f"time_padding must be one of {TIME_PADDINGS}, got {time_padding!r}")


def conv_out_len(n: int, pad: int, k: int, stride: int, dilation: int = 1) -> int:
    """Output length of a convolution over ``n + pad`` positions (0 if too short)."""
    span = n + pad - dilation * (k - 1) - 1
    return span // stride + 1 if span >= 0 else 0


def _conv3d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int, int],
    dilation: tuple[int, int, int],
    front: int,
    back: int,
    context: Tensor | None,
) -> Tensor:
    kT, kH, kW = weight.shape[2:]
    if context is not None:
        x = torch.cat([context.to(x.dtype), x], dim=2)
        front = 0
    ph, pw = dilation[1] * (kH // 2), dilation[2] * (kW // 2)
    T_out = conv_out_len(x.shape[2], front + back, kT, stride[0], dilation[0])
    if T_out == 0:
        H_out = conv_out_len(x.shape[3], 2 * ph, kH, stride[1], dilation[1])
        W_out = conv_out_len(x.shape[4], 2 * pw, kW, stride[2], dilation[2])
        return x.new_zeros(x.shape[0], weight.shape[0], 0, H_out, W_out)
    x = F.pad(x, (pw, pw, ph, ph, front, back))
    return F.conv3d(x, weight, bias, stride=stride, dilation=dilation)


def causal_conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: tuple[int, int, int] = (1, 1, 1),
    dilation: tuple[int, int, int] = (1, 1, 1),
    time_padding: str = "causal",
    context: Tensor | None = None,
    kernels: bool = True,
) -> Tensor:
    """Time-padded 3D convolution (see the module docstring).

    Args:
        x: ``[B, C_in, T, H, W]``, any float dtype.
        weight: ``[C_out, C_in, kT, kH, kW]`` with odd ``kH``, ``kW``; bias: ``[C_out]`` or None.
        stride, dilation: ``(t, h, w)``.
        time_padding: ``"causal"`` (``dilation_t * (kT - 1)`` zero frames before) or
            ``"symmetric"`` (public MUG-V rule, see :func:`time_pads`).
        context: ``[B, C_in, P, H, W]``, the ``P`` frames that precede ``x`` in the stream;
            they replace the front padding (``time_padding="causal"`` only). The kernel
            path is used when ``P == dilation_t * (kT - 1)``; any other ``P`` (the tail of a
            stream cut at an odd place) runs the PyTorch path.
        kernels: use the ``mugv_kernels`` op when available.

    Returns:
        ``[B, C_out, T_out, H_out, W_out]`` with ``T_out = (P_front + T + P_back -
        dilation_t * (kT - 1) - 1) // stride_t + 1`` (0 when negative) and "same"-padded
        space divided by the stride.

    Raises:
        ValueError: ``context`` with ``time_padding="symmetric"``.
    """
    kT = weight.shape[2]
    front, back = time_pads(kT, stride[0], dilation[0], time_padding)
    if context is not None and time_padding != "causal":
        raise ValueError("context (streaming) needs time_padding='causal'")
    if context is not None and context.shape[2] == 0:
        context = None
        front = 0
    if kernels and has_kernel_ops() and x.shape[2] > 0:
        if context is None and front + x.shape[2] + back >= dilation[0] * (kT - 1) + 1:
            return _mk.causal_conv3d(
                x, weight, bias, stride=tuple(stride), dilation=tuple(dilation), time_padding=time_padding
            )
        if context is not None and context.shape[2] == front:
            return _mk.causal_conv3d(
                x, weight, bias, stride=tuple(stride), dilation=tuple(dilation), time_padding="causal",
                context=context,
            )
    return _conv3d_torch(x, weight, bias, tuple(stride), tuple(dilation), front, back, context)


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-6,
    silu: bool = True,
    kernels: bool = True,
) -> Tensor:
    """``silu(group_norm(x, num_groups, weight, bias, eps))`` (``silu=False``: the norm only).

    Args:
        x: ``[B, C, *spatial]`` (the VAE passes ``[B, C, T, H, W]``: statistics over the
            group's channels and every frame and pixel, as ``nn.GroupNorm``).
        num_groups: divides ``C``. weight, bias: ``[C]`` or None. eps: variance epsilon
            (``nn.GroupNorm``'s default is ``1e-5``; the public MUG-V VAE uses it).
        kernels: use :func:`mugv_kernels.group_norm_silu` when available.

    Returns:
        A tensor like ``x``. Statistics in fp32 on both paths.
    """
    if x.numel() == 0:
        return x
    if kernels and has_kernel_ops():
        return _mk.group_norm_silu(x, num_groups, weight, bias, eps=eps, silu=silu)
    y = F.group_norm(x.float(), num_groups, weight.float() if weight is not None else None,
                     bias.float() if bias is not None else None, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
