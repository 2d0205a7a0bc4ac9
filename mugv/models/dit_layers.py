"""Building blocks of the MUG-V DiT (:mod:`mugv.models.dit`), on packed token sequences.

Every module here keeps the attribute names and parameter shapes of the public MUG-V code
(``mug_v/dit/module.py`` and ``mug_v/dit/model.py`` of ``Shopee-MUG/MUG-V``; arXiv 2510.17519
Sec. 3), so a public state dict loads with ``strict=True``. The computation differs in layout:
all clips of a batch run as ONE packed ("THD") sequence ``x [1, N, C]`` with
``N = sum_i (T_i * H_i * W_i + 2)`` tokens (start token, the clip's patches in (t, h, w)
order, end token), attention is variable-length over ``cu_seqlens``, and the adaLN
modulation of a token is picked from a small table by an index instead of being
materialized per token. :class:`PackedBatch` carries that per-forward metadata.

Every normalization, RoPE and attention is one call of a :mod:`mugv_kernels` op
(``ada_layer_norm``, ``gated_residual``, ``gated_residual_ada_layer_norm``,
``qk_norm_rope3d``, ``varlen_attention``); the model has no computation path of its own.
``PackedBatch.backend`` (chosen once, from ``MUGDiT(kernels=...)``) is passed to the ops as
their ``backend`` keyword: ``"auto"`` (the fused Triton kernels on CUDA, the PyTorch
reference on a plain CPU and in fp64), ``"triton"`` or ``"reference"``. Attention takes
``PackedBatch.attn_backend``. The model builds the modulation index, RoPE positions and
``cu_seqlens`` itself, so the ops' host-side value checks (one device sync each) are
switched off (``validate=False`` / ``check_positions=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mugv_kernels as mk
from mugv.profiling import annotate

__all__ = [
    "CrossAttention",
    "FinalLayer",
    "FpsEmbedder",
    "MLP",
    "MUGDiTBlock",
    "PackedBatch",
    "PatchEmbed3D",
    "RMSNorm",
    "SelfAttention",
    "TextEmbedder",
    "TimestepEmbedder",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------------------
# Per-forward metadata of a packed batch
# ----------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """What every block needs about the packed batch, built once per forward.

    With ``n`` clips and ``N`` packed video tokens (start/end tokens included):

    Attributes:
        t_mlp: ``[2n, 6C]`` adaLN-single output ``t_block(t_emb)``; row ``i`` is clip ``i``'s
            timestep, row ``n + i`` its timestep-0 (``t0``) set (conditioned frames and the
            start/end tokens use it).
        index: ``[1, N]`` int32, the row of ``t_mlp`` each token uses.
        positions: ``[N, 3]`` int32 RoPE positions in columns (h, w, t).
        cu_seqlens: ``[n + 1]`` int32 token offsets of the clips; ``max_seqlen`` the
            longest clip (a Python int).
        text: ``[L, C]`` embedded caption tokens of all clips, packed, padding stripped.
        text_cu_seqlens, text_max_seqlen: the same segmentation for ``text``
            (caption ``i`` belongs to clip ``i``).
        backend: ``backend`` of the norm and RoPE ops (``"auto" | "triton" | "reference"``).
        attn_backend: ``backend`` of ``mugv_kernels.varlen_attention`` (``"auto"``:
            flash-attn / PyTorch native / FlexAttention / SDPA, whichever runs here).
    """

    t_mlp: Tensor
    index: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    text: Tensor
    text_cu_seqlens: Tensor
    text_max_seqlen: int
    backend: str = "auto"
    attn_backend: str = "auto"

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cross: bool, scale: float) -> Tensor:
        """``mugv_kernels.varlen_attention`` of ``q [N, H, D]`` within each clip, against the
        clip's own tokens (self-attention) or its caption ``k, v [L, H, D]`` (``cross``)."""
        cu_k, max_k = (self.text_cu_seqlens, self.text_max_seqlen) if cross else (self.cu_seqlens, self.max_seqlen)
        return mk.varlen_attention(
            q, k, v, self.cu_seqlens, cu_k, self.max_seqlen, max_k, scale=scale, backend=self.attn_backend,
            validate=False,
        )  # fmt: skip


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t * f_j), sin(t * f_j)]`` with ``f_j = max_period^(-j / (dim/2))``.

    The DiT / GLIDE embedding (public ``TimestepEmbedder.timestep_embedding``).

    Args:
        t: ``[n]`` (fractional values allowed).
        dim: embedding width (odd: one zero column appended).

    Returns:
        ``[n, dim]`` fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [n, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ----------------------------------------------------------------------------------------
# Modules (attribute names = public MUG-V names)
# ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Per-head RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim with a
    ``[D]`` weight (public ``RMSNorm``). Self-attention fuses it into ``qk_norm_rope3d``
    and only reads ``weight``/``eps``; cross-attention calls it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        """``x [T, H, D]`` -> ``[T, H, D]`` in ``x.dtype`` (statistics in fp32):
        ``mugv_kernels.ada_layer_norm(norm="rms")`` on the ``[1, T*H, D]`` view."""
        T, H, D = x.shape
        y = mk.ada_layer_norm(x.reshape(1, T * H, D), None, None, weight=self.weight, eps=self.eps, norm="rms", backend=backend)
        return y.view(T, H, D)


class MLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` (public ``MLP`` with ``hidden_features``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    @annotate("dit.mlp")
    def forward(self, x: Tensor) -> Tensor:
        """``[..., in]`` -> ``[..., out]``."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Diffusion time -> ``[n, C]``: sinusoid (256) -> Linear -> SiLU -> Linear
    (public ``TimestepEmbedder``; parameters ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        """``t [n]`` (any float dtype; 0..1000 for MUG-V) -> ``[n, C]`` in the parameter dtype."""
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class FpsEmbedder(TimestepEmbedder):
    """Frame rate -> ``[n, C]``, the same structure as :class:`TimestepEmbedder`
    (public ``FpsEmbedder``); added to the timestep embedding."""


class TextEmbedder(nn.Module):
    """Caption states -> model width: LayerNorm (no affine) -> MLP -> LayerNorm (no affine)
    (public ``TextEmbedder``; parameters ``y_proj.fc1``, ``y_proj.fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, eps: float = 1e-6):
        super().__init__()
        self.y_proj = MLP(in_features, hidden_features, hidden_features)
        self.eps = eps

    def forward(self, y: Tensor) -> Tensor:
        """``y [..., text_dim]`` -> ``[..., C]`` (per token: padding may be stripped before)."""
        y = F.layer_norm(y, (y.shape[-1],), eps=self.eps)
        y = self.y_proj(y)
        return F.layer_norm(y, (y.shape[-1],), eps=self.eps)


class PatchEmbed3D(nn.Module):
    """Latent video -> patch tokens with a stride-``patch`` Conv3d (public ``PatchEmbed3D``).

    Sizes that are not multiples of the patch are zero-padded at the end of each axis,
    as the public code does.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, T, H, W]`` -> ``[B, Nt*Nh*Nw, C]`` tokens in (t, h, w) order."""
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[-3:]
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        x = self.proj(x)  # [B, C, Nt, Nh, Nw]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class SelfAttention(nn.Module):
    """Self-attention with QK RMSNorm and 3D RoPE over each clip of the packed batch
    (public ``Attention``: ``qkv`` with bias, ``q_norm``/``k_norm``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, rope_sections: Sequence[int], rope_theta: float, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope_sections = tuple(rope_sections)
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = nn.Linear(dim, dim)

    @annotate("dit.self_attn")
    def forward(self, h: Tensor, batch: PackedBatch) -> Tensor:
        """``h [1, N, C]`` (normalized, modulated) -> ``[1, N, C]``."""
        N, C = h.shape[1], h.shape[2]
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(h).view(N, 3, H, D).unbind(1)  # [N, H, D] each
        q, k = mk.qk_norm_rope3d(
            q, k, batch.positions, self.rope_sections, q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
            eps=self.q_norm.eps, theta=self.rope_theta, interleaved=True, check_positions=False, backend=batch.backend,
        )  # fmt: skip
        o = batch.attention(q, k, v, cross=False, scale=D**-0.5)  # [N, H, D]
        return self.proj(o.reshape(1, N, C))


class CrossAttention(nn.Module):
    """Cross-attention of each clip's tokens to its own caption, QK RMSNorm, no RoPE
    (public ``CrossAttention``: ``q_linear``, ``kv_linear``, ``q_norm``, ``k_norm``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.proj = nn.Linear(dim, dim)

    @annotate("dit.cross_attn")
    def forward(self, h: Tensor, batch: PackedBatch) -> Tensor:
        """``h [1, N, C]`` (LayerNorm'd) and ``batch.text [L, C]`` -> ``[1, N, C]``."""
        N, C = h.shape[1], h.shape[2]
        H, D = self.num_heads, self.head_dim
        L = batch.text.shape[0]
        q = self.q_linear(h).view(N, H, D)
        k, v = self.kv_linear(batch.text).view(L, 2, H, D).unbind(1)  # [L, H, D] each
        q, k = self.q_norm(q, batch.backend), self.k_norm(k, batch.backend)
        o = batch.attention(q, k, v, cross=True, scale=D**-0.5)  # [N, H, D]
        return self.proj(o.reshape(1, N, C))


class MUGDiTBlock(nn.Module):
    """One MUG-V DiT block (public ``MUGDiTBlock``), adaLN-single modulated::

        x = x + gate_msa * attn(LN(x) * (1 + scale_msa) + shift_msa)
        x = x + cross_attn(LN_affine(x), text)
        x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)

    shift/scale/gate come from ``scale_shift_table [6, C] + t_mlp`` per modulation row; each
    token picks its row (timestep or ``t0``) through ``PackedBatch.index``, so image-to-video
    needs one normalization instead of the public double norm + ``torch.where``. Four
    memory passes on the kernel path: modulated norm, gated residual + affine norm,
    residual + modulated norm, gated residual.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        rope_sections: Sequence[int],
        rope_theta: float,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.eps = eps
        self.attn = SelfAttention(hidden_size, num_heads, rope_sections, rope_theta, eps)
        self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads, eps)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, batch: PackedBatch) -> Tensor:
        """``x [1, N, C]`` residual stream -> ``[1, N, C]``."""
        G, C = batch.t_mlp.shape[0], x.shape[-1]
        mod = (batch.t_mlp.view(G, 6, C) + self.scale_shift_table[None]).unsqueeze(0)  # [1, G, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(2)  # [1, G, C] each
        b, idx = batch.backend, batch.index
        h = mk.ada_layer_norm(x, shift_msa, scale_msa, index=idx, eps=self.eps, validate=False, backend=b)
        a = self.attn(h, batch)  # [1, N, C]
        cn = self.cross_attn_norm
        x, h = mk.gated_residual_ada_layer_norm(
            x, a, gate_msa, None, None, index=idx, weight=cn.weight, bias=cn.bias, eps=cn.eps, validate=False, backend=b
        )
        c = self.cross_attn(h, batch)  # [1, N, C]
        x, h = mk.gated_residual_ada_layer_norm(
            x, c, None, shift_mlp, scale_mlp, index=idx, eps=self.eps, validate=False, backend=b
        )
        m = self.mlp(h)  # [1, N, C]
        return mk.gated_residual(x, m, gate_mlp, index=idx, validate=False, backend=b)


class FinalLayer(nn.Module):
    """Modulated LayerNorm -> Linear to ``prod(patch) * out_channels`` per token (public
    ``FinalLayer``); modulated by ``scale_shift_table [2, C] + t_emb`` (not ``t_mlp``)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t_emb: Tensor, batch: PackedBatch) -> Tensor:
        """``x [1, N, C]``, ``t_emb [G, C]`` -> ``[1, N, prod(patch) * C_out]``."""
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unsqueeze(0).unbind(2)  # [1, G, C] each
        h = mk.ada_layer_norm(x, shift, scale, index=batch.index, eps=self.eps, validate=False, backend=batch.backend)
        return self.linear(h)
