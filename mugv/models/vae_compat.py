"""Building blocks of the ``"mugv-compat"`` VAE preset: the public MUG-V temporal VAE.

The public MUG-V video VAE (``MUGAutoencoderPipeline`` in ``mug_v/encoder/vae/vae.py`` of
``Shopee-MUG/MUG-V``) is a frame-wise SDXL image VAE (8x8 in space, 512 feature channels)
followed by ``MUGVAETemporal`` (``mug_v/encoder/vae/vae_temporal.py``), a MAGVIT-style 3D
conv VAE that compresses time by 8 into 24 latent channels. This module rebuilds the
temporal stage on our ops with the *same module tree* (``encoder.conv_in.conv.weight``,
``encoder.block_res_blocks.0.1.norm2.bias``, ``decoder.conv_blocks.1.conv.weight``, ...),
so a public state dict loads with ``strict=True``, and the same math:

* every conv is a :class:`mugv_kernels.nn.CausalConv3d` (held by a :class:`ConvSlot` for
  the public key names) with the public *symmetric* time padding
  (``total = d*(kT-1) + 1 - stride``, ``total // 2`` frames before): despite its name
  it is not causal;
* GroupNorm (eps 1e-5) over channels x frames x pixels, then SiLU (fused:
  :class:`mugv_kernels.nn.GroupNormSiLU`) or ReLU;
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

from mugv_kernels.nn import CausalConv3d, GroupNormSiLU

__all__ = ["CompatDecoder", "CompatEncoder", "CompatResBlock", "CompatUpsampleBlock", "ConvSlot", "norm_act"]


class ConvSlot(nn.Module):
    """One :class:`mugv_kernels.nn.CausalConv3d`, held as ``.conv`` so that its parameters are
    named ``<name>.conv.weight`` / ``<name>.conv.bias``: the key layout of the public MUG-V
    ``CausalConv3d``, which wraps an ``nn.Conv3d`` the same way.

    Args:
        in_channels, out_channels, kernel_size, **kwargs: as :class:`mugv_kernels.nn.CausalConv3d`
            (``time_padding`` defaults to the public ``"symmetric"`` here).

    ``forward(x [B, C_in, T, H, W], context=None) -> [B, C_out, T_out, H_out, W_out]``
    (see :func:`mugv_kernels.causal_conv3d`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, time_padding: str = "symmetric",
                 **kwargs) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size, time_padding=time_padding, **kwargs)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.conv(x, context)


def norm_act(norm: GroupNormSiLU, x: Tensor, activation: str) -> Tensor:
    """``norm`` (GroupNorm, fused with SiLU for ``"swish"``), then ReLU for ``"relu"``."""
    y = norm(x)
    return y if activation == "swish" else F.relu(y)


def group_norm(num_groups: int, channels: int, activation: str, eps: float = 1e-5) -> GroupNormSiLU:
    """The GroupNorm (+ SiLU when ``activation == "swish"``) of a block; parameters
    ``weight``/``bias`` as ``nn.GroupNorm`` (eps 1e-5, its default, in the public VAE)."""
    return GroupNormSiLU(num_groups, channels, eps=eps, silu=activation == "swish")


class CompatResBlock(nn.Module):
    """Public ``ResBlock``: ``x' = conv2(act(gn2(conv1(act(gn1(x)))))) + shortcut(x)``,
    3x3x3 convs without bias, 1x1x1 shortcut ``conv3`` when ``in_channels != filters``.
    ``[B, in_channels, T, H, W] -> [B, filters, T, H, W]``."""

    def __init__(self, in_channels: int, filters: int, num_groups: int, activation: str) -> None:
        super().__init__()
        self.in_channels, self.filters, self.activation = in_channels, filters, activation
        self.norm1 = group_norm(num_groups, in_channels, activation)
        self.conv1 = ConvSlot(in_channels, filters, 3, bias=False)
        self.norm2 = group_norm(num_groups, filters, activation)
        self.conv2 = ConvSlot(filters, filters, 3, bias=False)
        if in_channels != filters:
            self.conv3 = ConvSlot(in_channels, filters, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_act(self.norm1, x, self.activation))
        h = self.conv2(norm_act(self.norm2, h, self.activation))
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
        self.conv_in = ConvSlot(in_out_channels, filters, 3, bias=False)
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
                    self.conv_blocks.append(ConvSlot(prev, width, 3, stride=(2, 1, 1)))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = nn.ModuleList(CompatResBlock(width, width, num_groups, activation)
                                        for _ in range(num_res_blocks))
        self.norm1 = group_norm(num_groups, width, activation)
        self.conv2 = ConvSlot(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                x = block(x)
            if i < self.num_blocks - 1:
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(norm_act(self.norm1, x, self.activation))


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
        width = filters * channel_multipliers[-1]
        self.conv1 = ConvSlot(latent_embed_dim, width, 3, bias=True)
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
                    ups.insert(0, ConvSlot(prev, prev * 2, 3))
                else:
                    ups.insert(0, nn.Identity())
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = group_norm(num_groups, prev, activation)
        self.conv_out = ConvSlot(width, in_out_channels, 3)

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
        return self.conv_out(norm_act(self.norm1, x, self.activation))
