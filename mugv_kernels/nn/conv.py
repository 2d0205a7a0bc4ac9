"""Drop-in modules for the video-VAE family (:mod:`mugv_kernels.ops.conv3d`,
:mod:`mugv_kernels.ops.group_norm`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mugv_kernels._validate import triple
from mugv_kernels.ops.conv3d import causal_conv3d
from mugv_kernels.ops.group_norm import group_norm_silu

__all__ = ["CausalConv3d", "GroupNormSiLU"]


class CausalConv3d(nn.Module):
    """3D convolution with causal (or MUG-V symmetric) time padding and fused zero spatial
    padding; see :func:`mugv_kernels.causal_conv3d` for the exact rules.

    Parameters ``weight [C_out, C_in, kT, kH, kW]`` and ``bias [C_out]`` have the names and
    initialization of ``nn.Conv3d`` (Kaiming-uniform), so a VAE checkpoint's ``conv.weight``
    / ``conv.bias`` load into it.

    Streaming: with ``time_padding="causal"`` a long video can be encoded chunk by chunk::

        ctx = None
        for chunk in chunks:                    # [B, C_in, T_i, H, W], T_i % stride_t == 0
            y, ctx = conv.forward_chunk(chunk, ctx)

    which equals ``conv(torch.cat(chunks, 2))`` frame for frame, with memory bounded by one
    chunk plus ``context_frames`` carried frames.

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: ``(kT, kH, kW)`` or one int; kH, kW odd.
        stride, dilation: ``(t, h, w)`` or one int (default 1).
        bias: learn a bias (default True).
        time_padding: ``"causal"`` (default) or ``"symmetric"``.
        pad_mode: ``"zeros"`` (default) or ``"replicate"`` (time padding).
        backend: as :func:`mugv_kernels.causal_conv3d` (default ``"auto"``).

    Shapes:
        ``forward(x [B, C_in, T, H, W], context=None [B, C_in, P, H, W])`` returns
        ``[B, C_out, T_out, H_out, W_out]`` in ``x``'s dtype and memory format.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        stride: int | tuple[int, int, int] = 1,
        dilation: int | tuple[int, int, int] = 1,
        bias: bool = True,
        time_padding: str = "causal",
        pad_mode: str = "zeros",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = triple("kernel_size", kernel_size)
        self.stride, self.dilation = triple("stride", stride), triple("dilation", dilation)
        if self.kernel_size[1] % 2 == 0 or self.kernel_size[2] % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got kernel_size={self.kernel_size}")
        self.time_padding, self.pad_mode, self.backend = time_padding, pad_mode, backend
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv3d``'s initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def context_frames(self) -> int:
        """P = ``dilation_t * (kT - 1)``: frames a chunk needs from before it."""
        return self.dilation[0] * (self.kernel_size[0] - 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return causal_conv3d(
            x, self.weight, self.bias, stride=self.stride, dilation=self.dilation,
            time_padding=self.time_padding, pad_mode=self.pad_mode, context=context, backend=self.backend,
        )  # fmt: skip

    def next_context(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """The ``P`` frames that precede the chunk after ``x``: the tail of
        ``cat(context, x)`` in time (for the first chunk, ``context=None``: the causal
        padding frames stand in when ``x`` is shorter than ``P``). None when ``P = 0``."""
        P = self.context_frames
        if P == 0:
            return None
        if x.shape[2] >= P:
            return x[:, :, x.shape[2] - P :]
        if context is None:
            B, C, _, H, W = x.shape
            if self.pad_mode == "replicate" and x.shape[2] > 0:
                context = x[:, :, :1].expand(B, C, P, H, W)
            else:
                context = x.new_zeros(B, C, P, H, W)
        return torch.cat([context, x], dim=2)[:, :, -P:]

    def forward_chunk(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """One streaming step: ``(forward(x, context), next_context(x, context))``.

        ``time_padding="causal"`` only; chunk lengths must be multiples of ``stride_t``
        (except the last) for the chunks to tile the one-pass output.
        """
        if self.time_padding != "causal":
            raise ValueError("streaming needs time_padding='causal'")
        return self.forward(x, context), self.next_context(x, context)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, time_padding={self.time_padding!r}, pad_mode={self.pad_mode!r}, "
            f"bias={self.bias is not None}"
        )


class GroupNormSiLU(nn.Module):
    """``SiLU(GroupNorm(x))`` fused (:func:`mugv_kernels.group_norm_silu`); parameters
    named like ``nn.GroupNorm`` (``weight`` ones, ``bias`` zeros) so checkpoints load.

    Args:
        num_groups: G (divides ``num_channels``).
        num_channels: C.
        eps: default 1e-6.
        affine: learn ``weight``/``bias`` (default True).
        silu: apply SiLU (default True).
        backend: as :func:`mugv_kernels.group_norm_silu`.

    Shapes:
        ``forward(x [B, C, *spatial])`` returns the same shape, dtype and memory format.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-6,
        affine: bool = True,
        silu: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups, self.num_channels, self.eps, self.silu, self.backend = num_groups, num_channels, eps, silu, backend
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(
            x, self.num_groups, self.weight, self.bias, eps=self.eps, silu=self.silu, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}, silu={self.silu}"
