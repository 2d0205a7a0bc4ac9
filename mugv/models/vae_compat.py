"""Building blocks of the ``"mugv-compat"`` VAE preset: the public MUG-V temporal VAE.

The public MUG-V video VAE (``MUGAutoencoderPipeline`` in ``mug_v/encoder/vae/vae.py`` of
``Shopee-MUG/MUG-V``) is a frame-wise SDXL image VAE (8x8 in space, 512 feature channels)
followed by ``MUGVAETemporal`` (``mug_v/encoder/vae/vae_temporal.py``), a MAGVIT-style 3D
conv VAE that compresses time by 8 into 24 latent channels. This module rebuilds the
temporal stage on our ops with the *same module tree* (``encoder.conv_in.conv.weight``,
``encoder.block_res_blocks.0.1.norm2.bias``, ``decoder.conv_blocks.1.conv.weight``, ...),
so a public state dict loads with ``strict=True``, and the same math:

* every conv is a ``CausalConv3d`` with the public *symmetric* time padding
  (``total = d*(kT-1) + 1 - stride``, ``total // 2`` frames before): despite its name
  it is not causal;
* ``nn.GroupNorm`` (eps 1e-5) over channels x frames x pixels, then SiLU (or ReLU);
* encoder: conv_in -> per level ``num_res_blocks`` ResBlocks (1x1x1 conv shortcut when
  the width changes) -> a stride-(2,1,1) 3x3x3 conv where ``temporal_downsample[i]``
  (identity otherwise) -> ``num_res_blocks`` ResBlocks -> GroupNorm+act -> 1x1x1 conv to
  ``2 * latent_embed_dim``;
* decoder (time pattern fixed to ``(False, True, True)`` by the public constructor):
  3x3x3 conv -> ResBlocks -> an upsample block (nearest x2 in time, then a ResBlock) ->
  per level ResBlocks and a 3x3x3 conv to ``2 * width`` channels followed by
  depth-to-time (channel ``c * 2 + k`` goes to output frame ``2t + k``) -> GroupNorm+act
  -> 3x3x3 conv to ``in_out_channels``.

The spatial SDXL stage is a stock diffusers ``AutoencoderKL`` and is not part of this
preset (see :class:`mugv.models.VideoVAE`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mugv.models._vae_ops import causal_conv3d, group_norm_silu

__all__ = ["CausalConv3d", "CompatDecoder", "CompatEncoder", "CompatResBlock", "CompatUpsampleBlock"]


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Module):
    """A 3D conv with time padding; parameters live in ``self.conv`` (an ``nn.Conv3d``
    used only as the weight/bias holder, which gives the public key names
    ``<name>.conv.weight`` / ``<name>.conv.bias``).

    Args:
        chan_in, chan_out: channels. kernel_size: int or ``(kT, kH, kW)`` (odd kH, kW).
        stride: ``(t, h, w)`` or int. dilation_t: time dilation.
        time_padding: ``"symmetric"`` (public MUG-V) or ``"causal"``.
        bias: learn a bias.

    ``forward(x [B, C_in, T, H, W], context=None) -> [B, C_out, T_out, H_out, W_out]``;
    ``context`` (causal only): preceding frames, see :func:`mugv.models._vae_ops.causal_conv3d`.

    Raises:
        ValueError: even spatial kernel.
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size, *, stride=1, dilation_t: int = 1,
                 time_padding: str = "symmetric", bias: bool = True) -> None:
        super().__init__()
        k = _triple(kernel_size)
        if k[1] % 2 == 0 or k[2] % 2 == 0:
            raise ValueError(f"kernel_size must have odd height and width, got {k}")
        self.stride = _triple(stride)
        self.dilation = (dilation_t, 1, 1)
        self.time_padding = time_padding
        self.kernels = True
        self.conv = nn.Conv3d(chan_in, chan_out, k, stride=self.stride, dilation=self.dilation, bias=bias)

    @property
    def kernel_t(self) -> int:
        return self.conv.weight.shape[2]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return causal_conv3d(x, self.conv.weight, self.conv.bias, stride=self.stride, dilation=self.dilation,
                             time_padding=self.time_padding, context=context, kernels=self.kernels)


def _norm_act(norm: nn.GroupNorm, x: Tensor, activation: str, kernels: bool) -> Tensor:
    silu = activation == "swish"
    y = group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, silu=silu, kernels=kernels)
    return y if silu else F.relu(y)


class CompatResBlock(nn.Module):
    """Public ``ResBlock``: ``x' = conv2(act(gn2(conv1(act(gn1(x)))))) + shortcut(x)``,
    3x3x3 convs without bias, 1x1x1 shortcut ``conv3`` when ``in_channels != filters``.
    ``[B, in_channels, T, H, W] -> [B, filters, T, H, W]``."""

    def __init__(self, in_channels: int, filters: int, num_groups: int, activation: str) -> None:
        super().__init__()
        self.in_channels, self.filters, self.activation = in_channels, filters, activation
        self.kernels = True
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_act(self.norm1, x, self.activation, self.kernels))
        h = self.conv2(_norm_act(self.norm2, h, self.activation, self.kernels))
        return h + (self.conv3(x) if self.in_channels != self.filters else x)


class CompatUpsampleBlock(CompatResBlock):
    """Public ``UpsampleBlock``: nearest-neighbour x2 in time, then a :class:`CompatResBlock`."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.repeat_interleave(x, 2, dim=2))


class CompatEncoder(nn.Module):
    """Public temporal-VAE ``Encoder``: ``[B, in_out_channels, T, H, W] ->
    [B, out_channels, T / 2**sum(temporal_downsample), H, W]`` (see the module docstring)."""

    def __init__(self, in_out_channels: int, out_channels: int, filters: int, num_res_blocks: int,
                 channel_multipliers: tuple[int, ...], temporal_downsample: tuple[bool, ...], num_groups: int,
                 activation: str) -> None:
        super().__init__()
        self.num_res_blocks, self.activation = num_res_blocks, activation
        self.num_blocks = len(channel_multipliers)
        self.kernels = True
        self.conv_in = CausalConv3d(in_out_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        width = filters
        for i, mult in enumerate(channel_multipliers):
            width = filters * mult
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(CompatResBlock(prev, width, num_groups, activation))
                prev = width
            self.block_res_blocks.append(level)
            if i < self.num_blocks - 1:
                if temporal_downsample[i]:
                    self.conv_blocks.append(CausalConv3d(prev, width, 3, stride=(2, 1, 1)))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = nn.ModuleList(CompatResBlock(width, width, num_groups, activation)
                                        for _ in range(num_res_blocks))
        self.norm1 = nn.GroupNorm(num_groups, width)
        self.conv2 = CausalConv3d(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                x = block(x)
            if i < self.num_blocks - 1:
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(_norm_act(self.norm1, x, self.activation, self.kernels))


class CompatDecoder(nn.Module):
    """Public temporal-VAE ``Decoder``: ``[B, latent_embed_dim, L, H, W] ->
    [B, in_out_channels, 8 L, H, W]`` for the public time pattern (see the module docstring)."""

    def __init__(self, in_out_channels: int, latent_embed_dim: int, filters: int, num_res_blocks: int,
                 channel_multipliers: tuple[int, ...], temporal_downsample: tuple[bool, ...], num_groups: int,
                 activation: str) -> None:
        super().__init__()
        self.num_blocks = len(channel_multipliers)
        self.temporal_downsample = tuple(temporal_downsample)
        self.activation = activation
        self.kernels = True
        width = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(latent_embed_dim, width, 3, bias=True)
        self.res_blocks = nn.ModuleList(CompatResBlock(width, width, num_groups, activation)
                                        for _ in range(num_res_blocks))
        self.upsample_block = CompatUpsampleBlock(width, width, num_groups, activation)
        levels: list[nn.ModuleList] = []
        ups: list[nn.Module] = []
        prev = width
        for i in reversed(range(self.num_blocks)):
            width = filters * channel_multipliers[i]
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(CompatResBlock(prev, width, num_groups, activation))
                prev = width
            levels.insert(0, level)
            if i > 0:
                if self.temporal_downsample[i - 1]:
                    ups.insert(0, CausalConv3d(prev, prev * 2, 3))
                else:
                    ups.insert(0, nn.Identity())
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.conv_out = CausalConv3d(width, in_out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        x = self.upsample_block(x)
        for i in reversed(range(self.num_blocks)):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_downsample[i - 1]:
                    # depth to time: channel c * 2 + k -> frame 2 t + k
                    B, C2, T, H, W = x.shape
                    x = x.reshape(B, C2 // 2, 2, T, H, W).permute(0, 1, 3, 2, 4, 5).reshape(B, C2 // 2, 2 * T, H, W)
        return self.conv_out(_norm_act(self.norm1, x, self.activation, self.kernels))
