"""Independent re-implementation of the public MUG-V DiT forward, for tests only.

Written from reading ``mug_v/dit/model.py`` and ``mug_v/dit/module.py`` of
``Shopee-MUG/MUG-V`` and kept structurally like them, so that it checks
:class:`mugv.models.MUGDiT` rather than repeating it: complex-valued RoPE tables
(``space`` 384 / ``time`` 480 entries) indexed the public way, the (h, w, t) table
concatenation and start/end token picks of ``get_freq_cis``, two normalizations and a
``torch.where`` per modulated sub-layer for image-to-video, full-batch self-attention
(``flash_attn_func`` -> ``scaled_dot_product_attention``), cross-attention over the
concatenated captions with a block-diagonal mask (xformers ``BlockDiagonalMask`` -> a loop
over samples), ``rearrange``-style unpatchify written with ``permute``.

It never imports :mod:`mugv`. Parameter names match the public module tree, so a state
dict moves between it and ``MUGDiT`` with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SPACE_END, TIME_END = 384, 480


def rope_tables(head_dim: int, theta: float = 10000.0):
    """Public ``precompute_freqs_cis_for_3drope``: complex64 ``[384, head_dim/6]`` (space)
    and ``[480, head_dim/6]`` (time); frequency ``j`` is ``theta ** (-6 j / head_dim)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 6)[: head_dim // 6].float() / head_dim))
    space = torch.outer(torch.arange(SPACE_END, dtype=torch.float), freqs).float()
    time = torch.outer(torch.arange(TIME_END, dtype=torch.float), freqs).float()
    return torch.polar(torch.ones_like(space), space), torch.polar(torch.ones_like(time), time)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RMSNormP(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


class AttentionP(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNormP(self.hd)
        self.k_norm = RMSNormP(self.hd)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def rotate(x, fc):  # x [B, N, H, D], fc complex [B, N, 1, D/2]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * fc).flatten(3).type_as(x)

    def forward(self, x, freq_cis):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.hd).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        fc = freq_cis.unsqueeze(2)
        q, k = self.rotate(q, fc), self.rotate(k, fc)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.hd**-0.5)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class CrossAttentionP(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNormP(self.hd)
        self.k_norm = RMSNormP(self.hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond, y_lens):
        B, N, C = x.shape
        q = self.q_linear(x).view(1, -1, self.heads, self.hd)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.heads, self.hd).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        outs, start = [], 0
        for b in range(B):  # block-diagonal mask: queries of sample b see caption b only
            qb = q[:, b * N : (b + 1) * N].transpose(1, 2)
            kb = k[:, start : start + y_lens[b]].transpose(1, 2)
            vb = v[:, start : start + y_lens[b]].transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2))
            start += y_lens[b]
        return self.proj(torch.cat(outs, dim=1).reshape(B, -1, C))


class MLPP(nn.Module):
    def __init__(self, i, h, o=None):
        super().__init__()
        self.fc1 = nn.Linear(i, h)
        self.fc2 = nn.Linear(h, o or i)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedderP(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t):
        half = self.freq // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        a = t[:, None].float() * f[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)

    def forward(self, t, dtype):
        return self.mlp(self.sinusoid(t).to(dtype))


class FpsEmbedderP(TimestepEmbedderP):
    def forward(self, s, bs):  # s [b, 1]
        if s.shape[0] != bs:
            s = s.repeat(bs // s.shape[0], 1)
        emb = self.mlp(self.sinusoid(s.reshape(-1)).to(self.mlp[0].weight.dtype))
        return emb.reshape(s.shape[0], -1)


class TextEmbedderP(nn.Module):
    def __init__(self, i, h):
        super().__init__()
        self.y_proj = MLPP(i, h, h)
        self.pre_norm = nn.LayerNorm(i, eps=1e-6, elementwise_affine=False)
        self.post_norm = nn.LayerNorm(h, eps=1e-6, elementwise_affine=False)

    def forward(self, y):
        return self.post_norm(self.y_proj(self.pre_norm(y)))


class PatchEmbedP(nn.Module):
    def __init__(self, patch, cin, dim):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(cin, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        _, _, D, H, W = x.shape
        pt, ph, pw = self.patch
        if W % pw:
            x = F.pad(x, (0, pw - W % pw))
        if H % ph:
            x = F.pad(x, (0, 0, 0, ph - H % ph))
        if D % pt:
            x = F.pad(x, (0, 0, 0, 0, 0, pt - D % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


class BlockP(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = AttentionP(dim, heads)
        self.cross_attn_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.cross_attn = CrossAttentionP(dim, heads)
        self.mlp = MLPP(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t, y_lens, x_mask, t0, freq_cis):
        B = x.shape[0]
        sel = x_mask[:, :, None]
        m = (self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        m0 = (self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        h = torch.where(sel, modulate(self.norm(x), m[0], m[1]), modulate(self.norm(x), m0[0], m0[1]))
        a = self.attn(h, freq_cis)
        x = x + torch.where(sel, m[2] * a, m0[2] * a)
        x = x + self.cross_attn(self.cross_attn_norm(x), y, y_lens)
        h = torch.where(sel, modulate(self.norm(x), m[3], m[4]), modulate(self.norm(x), m0[3], m0[4]))
        f = self.mlp(h)
        return x + torch.where(sel, m[5] * f, m0[5] * f)


class FinalLayerP(nn.Module):
    def __init__(self, dim, num_patch, cout):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_patch * cout)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t, x_mask, t0, T, S):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        s0, c0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
        a = modulate(self.norm_final(x), shift, scale)
        b = modulate(self.norm_final(x), s0, c0)
        B, _, C = a.shape
        a, b = a.view(B, T, S, C), b.view(B, T, S, C)
        x = torch.where(x_mask[:, :, None, None], a, b).view(B, T * S, C)
        return self.linear(x)


class PublicMUGDiT(nn.Module):
    """The public ``MUGDiT`` (qk_norm=True) in plain torch. ``x_mask`` is required, as in
    the public forward (which references ``expand_x_mask`` unconditionally)."""

    def __init__(self, in_channels=24, patch_size=(1, 2, 2), hidden_size=288, depth=2, num_heads=4, mlp_ratio=4.0, text_dim=4096):
        super().__init__()
        self.cin, self.cout, self.patch, self.dim = in_channels, 2 * in_channels, tuple(patch_size), hidden_size
        self.heads = num_heads
        self.space_cis, self.time_cis = rope_tables(hidden_size // num_heads)
        self.x_embedder = PatchEmbedP(self.patch, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedderP(hidden_size)
        self.fps_embedder = FpsEmbedderP(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = TextEmbedderP(text_dim, hidden_size)
        self.blocks = nn.ModuleList(BlockP(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.start_token = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.end_token = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.final_layer = FinalLayerP(hidden_size, math.prod(self.patch), self.cout)

    def freq_cis(self, H, W, fi):  # fi [B, T + 2] long (cpu)
        B, T2 = fi.shape
        d = self.space_cis.shape[-1]
        h = self.space_cis[:H].reshape(1, 1, H, 1, d).repeat(B, T2, 1, W, 1)
        w = self.space_cis[:W].reshape(1, 1, 1, W, d).repeat(B, T2, H, 1, 1)
        t = self.time_cis[fi.clamp(0, TIME_END - 1)].reshape(B, T2, 1, 1, d).repeat(1, 1, H, W, 1)
        fc = torch.cat([h, w, t], dim=-1)  # [B, T+2, H, W, 3d]
        return torch.cat([fc[:, 0, 0, 0][:, None], fc[:, 1:-1].flatten(1, 3), fc[:, -1, -1, -1][:, None]], dim=1)

    def forward(self, x, timestep, y, mask, x_mask, fps, frame_indice):
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        _, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
        S = H * W
        f = self.fps_embedder(fps.unsqueeze(1), B)
        t = self.t_embedder(timestep, dtype) + f
        t0 = self.t_embedder(torch.zeros_like(timestep), dtype) + f
        t_mlp, t0_mlp = self.t_block(t), self.t_block(t0)
        # captions: embed, then keep valid tokens of each sample, concatenated
        ye = self.y_embedder(y)[:, 0]  # [B, L, C]
        if mask is not None:
            if mask.shape[0] != B:
                mask = mask.repeat(B // mask.shape[0], 1)
            ye = ye.masked_select(mask.unsqueeze(-1) != 0).view(1, -1, self.dim)
            y_lens = mask.sum(dim=1).tolist()
        else:
            y_lens = [ye.shape[1]] * B
            ye = ye.reshape(1, -1, self.dim)
        xe = self.x_embedder(x)
        xe = torch.cat([self.start_token.view(1, 1, -1).repeat(B, 1, 1), xe, self.end_token.view(1, 1, -1).repeat(B, 1, 1)], 1)
        zeros = torch.zeros(B, 1, dtype=torch.bool)
        ex_mask = torch.cat([zeros, x_mask.unsqueeze(2).repeat(1, 1, S).reshape(B, -1), zeros], dim=1)
        fc = self.freq_cis(H, W, frame_indice.detach().cpu())
        if fc.shape[0] != B:
            fc = fc.repeat(2, 1, 1)
        for blk in self.blocks:
            xe = blk(xe, ye, t_mlp, y_lens, ex_mask, t0_mlp, fc)
        out = self.final_layer(xe[:, 1:-1], t, x_mask, t0, T, S)  # [B, T*S, pt*ph*pw*cout]
        out = out.view(B, T, H, W, pt, ph, pw, self.cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, self.cout, T * pt, H * ph, W * pw)[:, :, :Tx, :Hx, :Wx]
        return out.to(torch.float32)
