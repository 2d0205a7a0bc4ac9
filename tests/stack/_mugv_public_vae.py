"""An independent, plain-PyTorch re-implementation of the public MUG-V temporal VAE, the
yardstick for ``VAEConfig.from_preset("mugv-compat")``.

Written from reading ``mug_v/encoder/vae/vae_temporal.py`` (``MUGVAETemporal`` and its
``CausalConv3d`` / ``ResBlock`` / ``UpsampleBlock`` / ``Encoder`` / ``Decoder``),
``mug_v/encoder/vae/utils.py`` (``DiagonalGaussianDistribution``) and the micro-frame loops
of ``MUGAutoencoderPipeline.encode/decode`` in ``mug_v/encoder/vae/vae.py`` of
``Shopee-MUG/MUG-V``. It deliberately shares no code with ``mugv``: ``nn.Conv3d`` and
``nn.GroupNorm`` modules called directly, ``F.pad`` for the time/space padding, the module
tree (and so the state-dict keys) of the public code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PubCausalConv3d(nn.Module):
    """Public ``CausalConv3d``: F.pad(W, W, H, H, front, back) with
    ``total = dilation*(kT-1) + 1 - stride`` split ``total//2`` before, then ``self.conv``."""

    def __init__(self, cin, cout, kernel_size, strides=None, bias=True, padding=0):
        super().__init__()
        k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 3
        st = strides[0] if strides is not None else 1
        total = (k[0] - 1) + (1 - st)
        self.pads = (k[2] // 2, k[2] // 2, k[1] // 2, k[1] // 2, total // 2, total - total // 2)
        self.conv = nn.Conv3d(cin, cout, k, stride=strides if strides is not None else (st, 1, 1), bias=bias,
                              padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, self.pads, mode="constant"))


class PubResBlock(nn.Module):
    def __init__(self, cin, cout, num_groups, upsample=False):
        super().__init__()
        self.cin, self.cout, self.upsample = cin, cout, upsample
        self.norm1 = nn.GroupNorm(num_groups, cin)
        self.conv1 = PubCausalConv3d(cin, cout, (3, 3, 3), bias=False)
        self.norm2 = nn.GroupNorm(num_groups, cout)
        self.conv2 = PubCausalConv3d(cout, cout, (3, 3, 3), bias=False)
        if cin != cout:
            self.conv3 = PubCausalConv3d(cin, cout, (1, 1, 1), bias=False)

    def forward(self, x):
        if self.upsample:
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode="nearest")
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.cin != self.cout:
            x = self.conv3(x)
        return h + x


class PubEncoder(nn.Module):
    def __init__(self, cin, cout, filters, nres, mults, tdown, groups):
        super().__init__()
        self.nres, self.nb = nres, len(mults)
        self.conv_in = PubCausalConv3d(cin, filters, (3, 3, 3), bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        for i in range(self.nb):
            f = filters * mults[i]
            items = nn.ModuleList()
            for _ in range(nres):
                items.append(PubResBlock(prev, f, groups))
                prev = f
            self.block_res_blocks.append(items)
            if i < self.nb - 1:
                if tdown[i]:
                    self.conv_blocks.append(PubCausalConv3d(prev, f, (3, 3, 3), strides=(2, 1, 1)))
                else:
                    self.conv_blocks.append(nn.Identity())
                prev = f
        self.res_blocks = nn.ModuleList([PubResBlock(prev, f, groups) for _ in range(nres)])
        self.norm1 = nn.GroupNorm(groups, f)
        self.conv2 = PubCausalConv3d(f, cout, (1, 1, 1), padding="same")

    def forward(self, x):
        x = self.conv_in(x)
        for i in range(self.nb):
            for j in range(self.nres):
                x = self.block_res_blocks[i][j](x)
            if i < self.nb - 1:
                x = self.conv_blocks[i](x)
        for b in self.res_blocks:
            x = b(x)
        return self.conv2(F.silu(self.norm1(x)))


class PubDecoder(nn.Module):
    def __init__(self, cout, zdim, filters, nres, mults, groups, tdown=(False, True, True)):
        super().__init__()
        self.nres, self.nb, self.tdown = nres, len(mults), tdown
        f = filters * mults[-1]
        prev = f
        self.conv1 = PubCausalConv3d(zdim, f, (3, 3, 3), bias=True)
        self.res_blocks = nn.ModuleList([PubResBlock(f, f, groups) for _ in range(nres)])
        self.upsample_block = PubResBlock(f, f, groups, upsample=True)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(self.nb)):
            f = filters * mults[i]
            items = nn.ModuleList()
            for _ in range(nres):
                items.append(PubResBlock(prev, f, groups))
                prev = f
            self.block_res_blocks.insert(0, items)
            if i > 0:
                if tdown[i - 1]:
                    self.conv_blocks.insert(0, PubCausalConv3d(prev, prev * 2, (3, 3, 3)))
                else:
                    self.conv_blocks.insert(0, nn.Identity())
        self.norm1 = nn.GroupNorm(groups, prev)
        self.conv_out = PubCausalConv3d(f, cout, 3)

    def forward(self, x):
        x = self.conv1(x)
        for b in self.res_blocks:
            x = b(x)
        x = self.upsample_block(x)
        for i in reversed(range(self.nb)):
            for j in range(self.nres):
                x = self.block_res_blocks[i][j](x)
            if i > 0:
                ts = 2 if self.tdown[i - 1] else 1
                x = self.conv_blocks[i - 1](x)
                # "B (C ts) T H W -> B C (T ts) H W"
                B, CT, T, H, W = x.shape
                x = x.view(B, CT // ts, ts, T, H, W).permute(0, 1, 3, 2, 4, 5).reshape(B, CT // ts, T * ts, H, W)
        return self.conv_out(F.silu(self.norm1(x)))


class PubPosterior:
    """Public ``DiagonalGaussianDistribution`` (mean/logvar split on dim 1, clamp)."""

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def kl(self):
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3, 4])


class PubTemporalVAE(nn.Module):
    """Public ``MUGVAETemporal`` (only what encode/decode need)."""

    def __init__(self, in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                 channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, False), num_groups=32):
        super().__init__()
        self.tdf = 2 ** sum(temporal_downsample)
        self.encoder = PubEncoder(in_out_channels, latent_embed_dim * 2, filters, num_res_blocks,
                                  channel_multipliers, temporal_downsample, num_groups)
        self.quant_conv = PubCausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = PubCausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = PubDecoder(in_out_channels, latent_embed_dim, filters, num_res_blocks, channel_multipliers,
                                  num_groups)

    def encode(self, x):
        pad = (self.tdf - x.shape[2] % self.tdf) % self.tdf
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
        B, C, T, H, W = x.shape
        chunks = x.view(B, C, T // 8, 8, H, W).permute(0, 2, 1, 3, 4, 5).reshape(B * (T // 8), C, 8, H, W)
        m = self.quant_conv(self.encoder(chunks))  # [(B n), 2E, 1, H, W]
        n = T // 8
        m = m.view(B, n, m.shape[1], m.shape[2], H, W).permute(0, 2, 1, 3, 4, 5).reshape(B, m.shape[1], -1, H, W)
        return PubPosterior(m)

    def decode(self, z, num_frames):
        pad = (self.tdf - num_frames % self.tdf) % self.tdf
        return self.decoder(self.post_quant_conv(z))[:, :, pad:]


def pipeline_encode_mean(vae: PubTemporalVAE, x, micro_frame_size):
    """``MUGAutoencoderPipeline.encode``'s temporal part with posterior.mode() instead of
    sample() (no spatial VAE, no normalization)."""
    if x.shape[2] % vae.tdf == 1:
        x = torch.cat([x[:, :, :1].repeat(1, 1, vae.tdf - 1, 1, 1), x], dim=2)
    outs = [vae.encode(x[:, :, i:i + micro_frame_size]).mean for i in range(0, x.shape[2], micro_frame_size)]
    return torch.cat(outs, dim=2)


def pipeline_decode(vae: PubTemporalVAE, z, num_frames, micro_frame_size):
    """``MUGAutoencoderPipeline.decode``'s temporal part (no spatial VAE, no normalization)."""
    step = micro_frame_size // vae.tdf
    outs = []
    for i in range(0, z.shape[2], step):
        outs.append(vae.decode(z[:, :, i:i + step], num_frames=min(micro_frame_size, num_frames)))
        num_frames -= micro_frame_size
    return torch.cat(outs, dim=2)
