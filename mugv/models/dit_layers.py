"""Building blocks of the MUG-V DiT (:mod:`mugv.models.dit`), on packed token sequences.

Every module here keeps the attribute names and parameter shapes of the public MUG-V code
(``mug_v/dit/module.py`` and ``mug_v/dit/model.py`` of ``Shopee-MUG/MUG-V``; arXiv 2510.17519
Sec. 3), so a public state dict loads with ``strict=True``. The computation differs in layout:
all clips of a batch run as ONE packed ("THD") sequence ``x [1, N, C]`` with
``N = sum_i (T_i * H_i * W_i + 2)`` tokens (start token, the clip's patches in (t, h, w)
order, end token), attention is variable-length over ``cu_seqlens``, and the adaLN
modulation of a token is picked from a small table by an index instead of being
materialized per token. :class:`PackedBatch` carries that per-forward metadata.

Each op has two paths, chosen by ``PackedBatch.kernels``:

* ``kernels=True``: the fused ops of :mod:`mugv_kernels` (``ada_layer_norm``,
  ``gated_residual``, ``gated_residual_ada_layer_norm``, ``qk_norm_rope3d``,
  ``varlen_attention``); an op that this ``mugv_kernels`` does not provide (yet) falls back
  to the reference below, so the model always runs. The model builds the modulation index,
  RoPE positions and ``cu_seqlens`` itself, so the ops' host-side value checks (one device
  sync each) are switched off (``validate=False`` / ``check_positions=False``).
* ``kernels=False``: plain PyTorch written here, independent of :mod:`mugv_kernels`
  (normalizations and RoPE in fp32, one rounding to the activation dtype; attention one
  segment at a time through ``torch.nn.functional.scaled_dot_product_attention``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mugv_kernels as mk

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
    "attention",
    "gated_residual",
    "gated_residual_norm",
    "modulated_norm",
    "qk_norm_rope",
    "rms_norm",
    "timestep_embedding",
]


def _kernel(name: str):
    """The :mod:`mugv_kernels` op ``name``, or None where this install lacks it."""
    return getattr(mk, name, None)


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
        cu_seqlens: ``[n + 1]`` int32 token offsets of the clips; ``seqlens`` the same as
            Python ints (length ``n``), ``max_seqlen`` their maximum.
        text: ``[L, C]`` embedded caption tokens of all clips, packed, padding stripped.
        text_cu_seqlens, text_seqlens, text_max_seqlen: the same segmentation for ``text``
            (caption ``i`` belongs to clip ``i``).
        kernels: run the fused :mod:`mugv_kernels` ops (True) or the plain PyTorch path.
        attn_backend: ``backend`` of ``mugv_kernels.varlen_attention`` on the kernel path
            (``"auto"``: flash-attn / PyTorch native / FlexAttention / SDPA, whichever runs here).
    """

    t_mlp: Tensor
    index: Tensor
    positions: Tensor
    cu_seqlens: Tensor
    seqlens: tuple[int, ...]
    max_seqlen: int
    text: Tensor
    text_cu_seqlens: Tensor
    text_seqlens: tuple[int, ...]
    text_max_seqlen: int
    kernels: bool = True
    attn_backend: str = "auto"


# ----------------------------------------------------------------------------------------
# Functional ops: fused kernel or plain PyTorch
# ----------------------------------------------------------------------------------------


def _select(m: Tensor | None, index: Tensor) -> Tensor | None:
    """Per-token rows of a modulation table: ``m [1, G, C]`` -> ``[1, N, C]`` by ``index [1, N]``."""
    if m is None:
        return None
    return m[0].index_select(0, index[0].long()).unsqueeze(0)


def _ref_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    """LayerNorm / RMSNorm over the last dim in fp32 (affine optional); returns fp32."""
    xf = x.float()
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(xf, (xf.shape[-1],), eps=eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def modulated_norm(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor | None,
    *,
    index: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    kernels: bool = True,
) -> Tensor:
    """adaLN: ``(LayerNorm(x) * weight + bias) * (1 + scale[index]) + shift[index]``.

    Public ``ada_modulate(norm(x), shift, scale)`` with the I2V ``torch.where`` between two
    modulation sets folded into ``index`` (one normalization whatever the number of sets).

    Args:
        x: ``[1, N, C]`` activations.
        shift, scale: ``[1, G, C]`` modulation table or None.
        index: ``[1, N]`` int, the table row of each token (required when G is used).
        weight, bias: optional ``[C]`` LayerNorm affine.
        eps: LayerNorm epsilon (1e-6 in MUG-V).
        kernels: use ``mugv_kernels.ada_layer_norm``.

    Returns:
        ``[1, N, C]`` in ``x.dtype``.
    """
    op = _kernel("ada_layer_norm") if kernels else None
    if op is not None:
        return op(x, shift, scale, index=index, weight=weight, bias=bias, eps=eps, validate=False)
    y = _ref_norm(x, weight, bias, eps, rms=False)
    if scale is not None:
        y = y * (1 + _select(scale, index).float())
    if shift is not None:
        y = y + _select(shift, index).float()
    return y.to(x.dtype)


def gated_residual(residual: Tensor, y: Tensor, gate: Tensor | None, *, index: Tensor | None, kernels: bool = True) -> Tensor:
    """``residual + gate[index] * y`` (``gate=None``: ``residual + y``).

    Args:
        residual, y: ``[1, N, C]``; gate: ``[1, G, C]`` or None; index: ``[1, N]`` int.

    Returns:
        ``[1, N, C]`` in ``residual.dtype`` (sum in fp32).
    """
    op = _kernel("gated_residual") if kernels else None
    if op is not None:
        return op(residual, y, gate, index=index, validate=False)
    g = y.float() if gate is None else _select(gate, index).float() * y.float()
    return (residual.float() + g).to(residual.dtype)


def gated_residual_norm(
    residual: Tensor,
    y: Tensor,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    *,
    index: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    kernels: bool = True,
) -> tuple[Tensor, Tensor]:
    """One sub-layer boundary: ``r = residual + gate * y``, ``out = modulated_norm(r)``.

    Args:
        residual, y: ``[1, N, C]``; gate/shift/scale: ``[1, G, C]`` or None;
        index, weight, bias, eps, kernels: as :func:`modulated_norm`.

    Returns:
        ``(r, out)``, both ``[1, N, C]`` in ``residual.dtype``; ``out`` normalizes ``r``
        as stored (rounded to its dtype), like the fused kernel.
    """
    op = _kernel("gated_residual_ada_layer_norm") if kernels else None
    if op is not None:
        return op(residual, y, gate, shift, scale, index=index, weight=weight, bias=bias, eps=eps, validate=False)
    r = gated_residual(residual, y, gate, index=index, kernels=False)
    return r, modulated_norm(r, shift, scale, index=index, weight=weight, bias=bias, eps=eps, kernels=False)


def rms_norm(x: Tensor, weight: Tensor, *, eps: float = 1e-6, kernels: bool = True) -> Tensor:
    """Per-head RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``.

    Public ``RMSNorm`` (``mug_v/dit/module.py``) as used for cross-attention Q/K.

    Args:
        x: ``[T, H, D]``; weight: ``[D]``.

    Returns:
        ``[T, H, D]`` in ``x.dtype`` (statistics in fp32).
    """
    T, H, D = x.shape
    op = _kernel("ada_layer_norm") if kernels else None
    if op is not None and x.numel() > 0:
        return op(x.reshape(1, T * H, D), None, None, weight=weight, eps=eps, norm="rms").view(T, H, D)
    return _ref_norm(x, weight, None, eps, rms=True).to(x.dtype)


def _ref_rope(x: Tensor, positions: Tensor, sections: Sequence[int], theta: float) -> Tensor:
    """Interleaved 3D RoPE of fp32 ``x [T, H, D]`` by ``positions [T, 3]``; fp32 out.

    Section ``s`` (width ``d_s``) rotates the pairs ``(2j, 2j+1)`` of its slice by
    ``positions[:, s] * theta ** (-2j / d_s)`` (public ``precompute_freqs_cis_for_3drope``
    and ``Attention.apply_rotary_emb``: ``view_as_complex`` pairs)."""
    inv_freq, column = [], []
    for s, d in enumerate(sections):
        j = torch.arange(0, d, 2, dtype=torch.float64, device=x.device)
        inv_freq.append((theta ** (-j / d)).float())
        column.append(torch.full((d // 2,), s, dtype=torch.long, device=x.device))
    inv_freq, column = torch.cat(inv_freq), torch.cat(column)  # [P], [P] with P = sum(sections) / 2
    angle = positions.float()[:, column] * inv_freq  # [T, P]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # [T, 1, P]
    P2 = 2 * inv_freq.numel()
    a, b = x[..., 0:P2:2], x[..., 1:P2:2]  # [T, H, P] each
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # [T, H, 2P]
    return torch.cat([rot, x[..., P2:]], dim=-1)


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    sections: Sequence[int],
    *,
    q_weight: Tensor,
    k_weight: Tensor,
    eps: float = 1e-6,
    theta: float = 10000.0,
    kernels: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of Q and K followed by interleaved 3D RoPE.

    Args:
        q, k: ``[T, H, D]``; positions: ``[T, 3]`` int in columns (h, w, t);
        sections: three even widths summing to ``D`` (MUG-V: ``(24, 24, 24)``);
        q_weight, k_weight: ``[D]`` RMSNorm weights; eps, theta: as MUG-V (1e-6, 1e4);
        kernels: use ``mugv_kernels.qk_norm_rope3d``.

    Returns:
        ``(q, k)`` rotated, ``[T, H, D]`` in the input dtype.
    """
    op = _kernel("qk_norm_rope3d") if kernels else None
    if op is not None:
        return op(
            q, k, positions, tuple(sections), q_weight=q_weight, k_weight=k_weight, eps=eps, theta=theta,
            interleaved=True, check_positions=False,
        )  # fmt: skip
    qn = _ref_norm(q, q_weight, None, eps, rms=True)
    kn = _ref_norm(k, k_weight, None, eps, rms=True)
    return _ref_rope(qn, positions, sections, theta).to(q.dtype), _ref_rope(kn, positions, sections, theta).to(k.dtype)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    kernels: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Variable-length (block-diagonal) attention: query segment ``b`` attends to key segment ``b``.

    Args:
        q: ``[Tq, H, D]``; k, v: ``[Tk, H, D]`` (THD layout).
        cu_seqlens_q, cu_seqlens_k: ``[n + 1]`` int32 segment offsets; ``seqlens_q/k`` the
            segment lengths as Python ints; ``max_seqlen_q/k`` their maxima.
        scale: softmax scale (``head_dim ** -0.5`` in MUG-V).
        kernels: use ``mugv_kernels.varlen_attention`` with ``backend`` (the offsets are
            built by the model, so its host-side value check is skipped).

    Returns:
        ``[Tq, H, D]`` in ``q.dtype``.
    """
    op = _kernel("varlen_attention") if kernels else None
    if op is not None:
        return op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, backend=backend, validate=False
        )
    outs = []
    for qi, ki, vi in zip(q.split(list(seqlens_q)), k.split(list(seqlens_k)), v.split(list(seqlens_k))):
        # [1, H, L, D] per segment
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], scale=scale
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


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
    """Holds the ``[D]`` weight of a per-head RMSNorm (public ``RMSNorm``); the math is
    :func:`rms_norm` / :func:`qk_norm_rope`, called by the attention modules."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D]`` -> RMS-normalized ``[..., D]`` (reference math)."""
        return _ref_norm(x, self.weight, None, self.eps, rms=True).to(x.dtype)


class MLP(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` (public ``MLP`` with ``hidden_features``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

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

    def forward(self, h: Tensor, batch: PackedBatch) -> Tensor:
        """``h [1, N, C]`` (normalized, modulated) -> ``[1, N, C]``."""
        N, C = h.shape[1], h.shape[2]
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(h).view(N, 3, H, D).unbind(1)  # [N, H, D] each
        q, k = qk_norm_rope(
            q, k, batch.positions, self.rope_sections,
            q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
            eps=self.q_norm.eps, theta=self.rope_theta, kernels=batch.kernels,
        )  # fmt: skip
        o = attention(
            q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.seqlens, batch.seqlens,
            batch.max_seqlen, batch.max_seqlen, scale=D**-0.5, kernels=batch.kernels, backend=batch.attn_backend,
        )  # fmt: skip  # [N, H, D]
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

    def forward(self, h: Tensor, batch: PackedBatch) -> Tensor:
        """``h [1, N, C]`` (LayerNorm'd) and ``batch.text [L, C]`` -> ``[1, N, C]``."""
        N, C = h.shape[1], h.shape[2]
        H, D = self.num_heads, self.head_dim
        L = batch.text.shape[0]
        q = self.q_linear(h).view(N, H, D)
        k, v = self.kv_linear(batch.text).view(L, 2, H, D).unbind(1)  # [L, H, D] each
        q = rms_norm(q, self.q_norm.weight, eps=self.q_norm.eps, kernels=batch.kernels)
        k = rms_norm(k, self.k_norm.weight, eps=self.k_norm.eps, kernels=batch.kernels)
        o = attention(
            q, k, v, batch.cu_seqlens, batch.text_cu_seqlens, batch.seqlens, batch.text_seqlens,
            batch.max_seqlen, batch.text_max_seqlen, scale=D**-0.5, kernels=batch.kernels, backend=batch.attn_backend,
        )  # fmt: skip  # [N, H, D]
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
        idx, kern, eps = batch.index, batch.kernels, self.eps
        h = modulated_norm(x, shift_msa, scale_msa, index=idx, eps=eps, kernels=kern)  # [1, N, C]
        a = self.attn(h, batch)  # [1, N, C]
        x, h = gated_residual_norm(
            x, a, gate_msa, None, None, index=idx,
            weight=self.cross_attn_norm.weight, bias=self.cross_attn_norm.bias, eps=self.cross_attn_norm.eps, kernels=kern,
        )  # fmt: skip
        c = self.cross_attn(h, batch)  # [1, N, C]
        x, h = gated_residual_norm(x, c, None, shift_mlp, scale_mlp, index=idx, eps=eps, kernels=kern)
        m = self.mlp(h)  # [1, N, C]
        return gated_residual(x, m, gate_mlp, index=idx, kernels=kern)


class FinalLayer(nn.Module):
    """Modulated LayerNorm -> Linear to ``prod(patch) * out_channels`` per token (public
    ``FinalLayer``); modulated by ``scale_shift_table [2, C] + t_emb`` (not ``t_mlp``)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t_emb: Tensor, index: Tensor, kernels: bool) -> Tensor:
        """``x [1, N, C]``, ``t_emb [G, C]``, ``index [1, N]`` -> ``[1, N, prod(patch) * C_out]``."""
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unsqueeze(0).unbind(2)  # [1, G, C] each
        h = modulated_norm(x, shift, scale, index=index, eps=self.eps, kernels=kernels)
        return self.linear(h)
