"""Test oracle: the MUG-V enhancer's Wan DiT forward and its one-step SDEdit sampler, written
independently in plain PyTorch from the public code (``mug_enhancer/models/wan_video_dit.py``,
``mug_enhancer/pipelines/wan_video.py`` and diffsynth's ``FlowMatchScheduler``), in the
public style: complex RoPE tables in fp64, two norms selected with ``torch.where`` for the
``t0`` tokens, SDPA over padded batches, per-sample unpatchify with einsum. Module names are
those of the public ``WanModel``, so its state dict is the released layout."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoid(dim, t):
    half = dim // 2
    t = t.to(torch.float64)
    s = torch.outer(t, torch.pow(10000, -torch.arange(half).to(t).div(half)))
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1)


def rope_table(n, dim, theta=10000.0):
    f = torch.outer(torch.arange(n), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(f), f)


def rope(x, grid, freqs):
    """x [B, S, N, D]; grid (f, h, w); freqs complex [1024, D/2]."""
    n, c = x.size(2), x.size(3) // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    s = f * h * w
    table = torch.cat([
        parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(s, 1, -1)
    out = []
    for i in range(x.size(0)):
        xc = torch.view_as_complex(x[i, :s].to(torch.float64).reshape(s, n, -1, 2))
        out.append(torch.view_as_real(xc * table).flatten(2))
    return torch.stack(out).float()


class RMS(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def sdpa(q, k, v):
    """[B, L, N, D] each -> [B, L, N*D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2)


class SelfAttn(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.n, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMS(dim, eps), RMS(dim, eps)

    def forward(self, x, grid, freqs):
        b, s = x.shape[:2]
        q = self.norm_q(self.q(x)).view(b, s, self.n, self.d)
        k = self.norm_k(self.k(x)).view(b, s, self.n, self.d)
        v = self.v(x).view(b, s, self.n, self.d)
        o = sdpa(rope(q, grid, freqs).to(v.dtype), rope(k, grid, freqs).to(v.dtype), v)
        return self.o(o.to(x.dtype))


class CrossAttn(SelfAttn):
    def forward(self, x, ctx):
        b = x.size(0)
        q = self.norm_q(self.q(x)).view(b, -1, self.n, self.d)
        k = self.norm_k(self.k(ctx)).view(b, -1, self.n, self.d)
        v = self.v(ctx).view(b, -1, self.n, self.d)
        return self.o(sdpa(q, k, v))


class Block(nn.Module):
    def __init__(self, dim, ffn, heads, eps, cross_norm):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttn(dim, heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps) if cross_norm else nn.Identity()
        self.cross_attn = CrossAttn(dim, heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def ln(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x, e, grid, freqs, ctx, e_t0=None, x_mask=None):
        e = (self.modulation + e).chunk(6, dim=1)
        if e_t0 is not None:
            e_t0 = (self.modulation + e_t0).chunk(6, dim=1)

        def pick(a, b):
            return a if e_t0 is None else torch.where(x_mask[None, :, None], b(), a)

        xt = pick(self.ln(x).float() * (1 + e[1]) + e[0], lambda: self.ln(x).float() * (1 + e_t0[1]) + e_t0[0])
        y = self.self_attn(xt.to(x.dtype), grid, freqs)
        x = pick(x + y * e[2], lambda: x + y * e_t0[2])
        x = x + self.cross_attn(self.norm3(x), ctx)
        xt = pick(self.ln(x).float() * (1 + e[4]) + e[3], lambda: self.ln(x).float() * (1 + e_t0[4]) + e_t0[3])
        y = self.ffn(xt.to(x.dtype))
        return pick(x + y * e[5], lambda: x + y * e_t0[5])


class Head(nn.Module):
    def __init__(self, dim, out, patch, eps):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, math.prod(patch) * out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e, e_t0=None, x_mask=None):
        e = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        n = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        xt = n * (1 + e[1]) + e[0]
        if e_t0 is not None:
            e_t0 = (self.modulation + e_t0.unsqueeze(1)).chunk(2, dim=1)
            xt = torch.where(x_mask[None, :, None], n * (1 + e_t0[1]) + e_t0[0], xt)
        return self.head(xt)


class PublicWanModel(nn.Module):
    """The public ``WanModel`` (t2v cross-attention, with ``patch_embedding2``)."""

    def __init__(self, *, dim, ffn_dim, num_heads, num_layers, in_dim=16, out_dim=16, text_dim=4096,
                 text_len=512, freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True, eps=1e-6):
        super().__init__()
        self.patch_size, self.text_len, self.freq_dim, self.dim, self.out_dim = patch_size, text_len, freq_dim, dim, out_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, patch_size, stride=patch_size)
        self.patch_embedding2 = nn.Conv3d(in_dim, dim, patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads, eps, cross_attn_norm) for _ in range(num_layers))
        self.head = Head(dim, out_dim, patch_size, eps)
        d = dim // num_heads
        self.freqs = torch.cat([rope_table(1024, d - 4 * (d // 6)), rope_table(1024, 2 * (d // 6)),
                                rope_table(1024, 2 * (d // 6))], dim=1)

    def forward(self, x, timestep, context, y=None, i2v=False, timestep_t0=None):
        """x [B, C, T, H, W] (a batch of equal-size videos); context [B, L, text_dim]."""
        xs = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        if y is not None:
            xs = [a + self.patch_embedding2(b.unsqueeze(0)) for a, b in zip(xs, y)]
        grid = tuple(xs[0].shape[2:])
        T, H, W = grid
        h = torch.cat([u.flatten(2).transpose(1, 2) for u in xs])
        e = self.time_embedding(sinusoid(self.freq_dim, timestep).float())
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        e_t0 = e0_t0 = x_mask = None
        if i2v:
            e_t0 = self.time_embedding(sinusoid(self.freq_dim, timestep_t0).float())
            e0_t0 = self.time_projection(e_t0).unflatten(1, (6, self.dim))
            x_mask = torch.zeros((T, H, W), dtype=torch.bool)
            x_mask[0] = True
            x_mask = x_mask.flatten()
        ctx = self.text_embedding(torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))])
                                               for u in context]))
        for blk in self.blocks:
            h = blk(h, e0, grid, self.freqs, ctx, e0_t0, x_mask)
        h = self.head(h, e, e_t0, x_mask)
        c = self.out_dim
        outs = []
        for u in h:
            u = u[: math.prod(grid)].view(*grid, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            outs.append(u.reshape(c, *[g * p for g, p in zip(grid, self.patch_size)]))
        return torch.stack(outs).float()


def flow_match_sigmas(steps, sigma_max=0.3, sigma_min=0.0, shift=1.0):
    """diffsynth ``FlowMatchScheduler(extra_one_step=True).set_timesteps(steps, 1.0, shift)``."""
    s = torch.linspace(sigma_max, sigma_min, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return s, s * 1000


def public_enhance(dit, latents_origin, noise, posi, nega, *, steps=1, cfg=2.0, sigma=0.3, shift=1.0):
    """``WanVideoPipeline.enhance_video`` between the VAE encode and decode: noise to sigma,
    keep latent frame 0 clean, Euler steps with CFG on the t0-modulated DiT."""
    sigmas, timesteps = flow_match_sigmas(steps, sigma, 0.0, shift)
    lat = (1 - sigmas[0]) * latents_origin + sigmas[0] * noise
    first = latents_origin[:, :, :1].clone()
    for i, t in enumerate(timesteps):
        lat[:, :, :1] = first
        ts = t.reshape(1).float()
        kw = dict(y=latents_origin, i2v=True, timestep_t0=torch.zeros_like(ts))
        v = dit(lat, ts, posi, **kw)
        if cfg != 1.0:
            vn = dit(lat, ts, nega, **kw)
            v = vn + cfg * (v - vn)
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        lat = lat + v * (nxt - sigmas[i])
    lat[:, :, :1] = first
    return lat


# ------------------------------------------------------------------ the original Wan2.1 VAE layout


def original_wan_vae_shapes(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                            temperal_downsample=(False, True, True)):
    """``{key: shape}`` of the original ``WanVAE_`` state dict (``Wan2.1_VAE.pth``), enumerated from
    the constructors of Wan2.1's ``wan/modules/vae.py`` (Encoder3d / Decoder3d / ResidualBlock /
    AttentionBlock / Resample; ``attn_scales`` empty, as released)."""
    out = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"] = (cout, cin, *k)
        out[f"{name}.bias"] = (cout,)

    def res(name, cin, cout):
        out[f"{name}.residual.0.gamma"] = (cin, 1, 1, 1)
        conv(f"{name}.residual.2", cout, cin, (3, 3, 3))
        out[f"{name}.residual.3.gamma"] = (cout, 1, 1, 1)
        conv(f"{name}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{name}.shortcut", cout, cin, (1, 1, 1))

    def middle(name, d):
        res(f"{name}.middle.0", d, d)
        out[f"{name}.middle.1.norm.gamma"] = (d, 1, 1)
        conv(f"{name}.middle.1.to_qkv", 3 * d, d, (1, 1))
        conv(f"{name}.middle.1.proj", d, d, (1, 1))
        res(f"{name}.middle.2", d, d)

    dims = [base_dim * u for u in (1, *dim_mult)]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            res(f"encoder.downsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            conv(f"encoder.downsamples.{n}.resample.1", cout, cout, (3, 3))
            if temperal_downsample[i]:
                conv(f"encoder.downsamples.{n}.time_conv", cout, cout, (3, 1, 1))
            n += 1
    middle("encoder", dims[-1])
    out["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z_dim, dims[-1], (3, 3, 3))
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))
    dims = [base_dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    up = tuple(temperal_downsample[::-1])
    conv("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    middle("decoder", dims[0])
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            cin //= 2
        for _ in range(num_res_blocks + 1):
            res(f"decoder.upsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != len(dim_mult) - 1:
            conv(f"decoder.upsamples.{n}.resample.1", cout // 2, cout, (3, 3))
            if up[i]:
                conv(f"decoder.upsamples.{n}.time_conv", 2 * cout, cout, (3, 1, 1))
            n += 1
    out["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return out
