"""The Wan2.1 video DiT of the MUG-V enhancer, on the ``mugv`` ops.

The enhancer (public ``mug_enhancer/models/wan_video_dit.py`` of ``Shopee-MUG/MUG-V``, a
fine-tune of Wan2.1-T2V-1.3B: Wan team, "Wan: Open and Advanced Large-Scale Video Generative
Models", 2025) is a Wan DiT with two image-to-video additions:

- a second patch embedding (``patch_embedding2``, zero-initialized for training) of the input
  video's latent ``y``, added to the patch embedding of the noised latent ``x``;
- MUG-style ``t0`` modulation: the tokens marked by ``x_mask`` (the first latent frame, kept
  clean) are modulated with the embedding of timestep ``timestep_t0`` (0) instead of ``t``.

Block (``WanAttentionBlock``), per token, with ``m = modulation + time_projection(e)`` split
in ``shift, scale, gate, c_shift, c_scale, c_gate`` (fp32):
``x += gate * self_attn(LN(x) * (1 + scale) + shift)`` (q/k RMSNorm over all heads, then 3D
RoPE); ``x += cross_attn(LN_affine(x), context)`` (``norm3``; q/k RMSNorm over all heads; all
``text_len`` caption rows attended, padding included, as the public model does);
``x += c_gate * ffn(LN(x) * (1 + c_scale) + c_shift)``. Head: ``LN(x) * (1 + scale) + shift``
with ``head.modulation + e`` (the time embedding itself), then a linear map and unpatchify.

Here each sub-layer boundary is one fused op (:func:`mugv_kernels.ada_layer_norm`,
:func:`mugv_kernels.gated_residual_ada_layer_norm`, :func:`mugv_kernels.gated_residual`), the
two modulation sets are selected per token by ``index`` (no second norm, no ``torch.where``),
and the QK norm + RoPE and the packed attention are the kernels the diffusers integration uses
(:func:`mugv_kernels.qk_norm_rope3d` with ``across_heads=True``, Wan's sections and positions
from :mod:`mugv_kernels.integrations.diffusers`, :func:`mugv_kernels.varlen_attention` with its
``cross_attention_offsets``). Parameter names are those of the public ``WanModel``,
so its ``dit_i2v.safetensors`` loads with ``strict=True``; :func:`wan_config_from_state_dict`
reads the sizes off the file.

RoPE: Wan's sections ``(t, h, w) = (D - 4 (D // 6), 2 (D // 6), 2 (D // 6))`` (44/42/42 at
head_dim 128), theta 1e4, interleaved pairs, 0-based positions (the public model builds complex
tables and rotates in fp64; here :func:`mugv_kernels.qk_norm_rope3d` computes the angles from
the integer positions, with no table).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

import mugv_kernels as mk
from mugv.models._backend import resolve_backend

__all__ = [
    "WAN_FLAVORS",
    "WanConfig",
    "WanDiT",
    "load_wan_dit",
    "sinusoidal_embedding",
    "wan_config_from_state_dict",
]

_WAN_HEAD_DIM = 128  # every released Wan2.1 flavor (1.3B: 1536 / 12, 14B: 5120 / 40)


def _integration():
    """The diffusers integration's Wan pieces (imported on first use: it imports diffusers)."""
    from mugv_kernels.integrations import diffusers as mkd

    return mkd


@dataclass(frozen=True)
class WanConfig:
    """Sizes of a Wan DiT (defaults: the enhancer's Wan2.1-T2V-1.3B, ``predict.py``).

    Attributes:
        dim, ffn_dim, num_heads, num_layers: width, MLP width, heads, blocks.
        in_dim, out_dim: latent channels in and out (16 for the Wan2.1 VAE).
        text_dim: caption feature width (umT5-XXL: 4096). text_len: caption rows the
            cross-attention sees (captions are zero-padded to it; public: 512).
        freq_dim: sinusoidal timestep features. patch_size: ``(pt, ph, pw)``.
        cross_attn_norm: affine LayerNorm (``norm3``) before the cross-attention.
        video_condition: the second patch embedding of the input video's latent.
        eps: of every norm (1e-6).
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    video_condition: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len",
                     "freq_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"WanConfig: dim {self.dim} must be num_heads ({self.num_heads}) times an even head_dim")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if len(tuple(self.patch_size)) != 3 or any(int(p) <= 0 for p in self.patch_size):
            raise ValueError(f"WanConfig.patch_size must be three positive ints, got {self.patch_size!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


WAN_FLAVORS: dict[str, WanConfig] = {
    "1.3b": WanConfig(),
    "debug": WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, text_len=8, freq_dim=16),
}
"""Named sizes: the enhancer's ``"1.3b"`` and a tiny ``"debug"`` one for tests."""


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """Wan's timestep features ``[cos(t w_j), sin(t w_j)]``, ``w_j = 10000^(-j / (dim/2))``,
    computed in fp64 (public ``sinusoidal_embedding_1d``).

    Args:
        dim: even feature count. t: ``[B]`` timesteps (0..1000 scale).

    Returns:
        ``[B, dim]`` fp32.
    """
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = pos[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


class _AcrossHeadsRMSNorm(nn.Module):
    """The learned weight ``[dim]`` of Wan's q/k RMSNorm over all heads (``norm_q``/``norm_k``,
    public ``WanRMSNorm``). Applied by :func:`mugv_kernels.qk_norm_rope3d` with
    ``across_heads=True`` (one kernel with the RoPE, or with no rotation for the cross-attention)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


_NO_ROTATION = (0, 0, 0)


def _norm_across_heads(x4: Tensor, norm: _AcrossHeadsRMSNorm, backend: str) -> Tensor:
    """``[B, L, H, D]`` -> RMSNorm over ``H * D`` with ``norm.weight``, no rotation."""
    pos = torch.zeros(x4.shape[1], 3, dtype=torch.int32, device=x4.device)
    return mk.qk_norm_rope3d(x4, None, pos, _NO_ROTATION, q_weight=norm.weight, eps=norm.eps, across_heads=True,
                             check_positions=False, backend=backend)[0]


class _WanAttention(nn.Module):
    """The projections of a Wan attention layer: ``q, k, v, o`` plain ``nn.Linear`` (peft LoRA
    wraps them) and the across-heads RMSNorms ``norm_q``, ``norm_k`` (public key layout)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = _AcrossHeadsRMSNorm(dim, eps)
        self.norm_k = _AcrossHeadsRMSNorm(dim, eps)


class WanSelfAttention(_WanAttention):
    """Self-attention with q/k RMSNorm over all heads and 3D RoPE (public ``WanSelfAttention``)."""

    def forward(self, x: Tensor, positions: Tensor, backend: str) -> Tensor:
        """``x [B, N, C]``, ``positions [N, 3]`` int32 (t, h, w) -> ``[B, N, C]``."""
        mkd = _integration()
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x).view(B, N, H, C // H)
        k = self.k(x).view(B, N, H, C // H)
        v = self.v(x).view(B * N, H, C // H)
        q, k = mk.qk_norm_rope3d(
            q, k, positions, mkd.wan_rope_sections(C // H), q_weight=self.norm_q.weight, k_weight=self.norm_k.weight,
            eps=self.norm_q.eps, theta=mkd.WAN_ROPE_THETA, interleaved=True, across_heads=True,
            check_positions=False, backend=backend,
        )  # fmt: skip
        cu = torch.arange(B + 1, device=x.device, dtype=torch.int32) * N
        out = mk.varlen_attention(q.reshape(B * N, H, -1), k.reshape(B * N, H, -1), v, cu, cu, N, N,
                                  backend=_attn_backend(backend), validate=False)
        return self.o(out.reshape(B, N, C).to(x.dtype))


class WanCrossAttention(_WanAttention):
    """Cross-attention to the caption rows (public ``WanT2VCrossAttention``)."""

    def forward(self, x: Tensor, context: Tensor, context_lengths: Tensor | None, backend: str) -> Tensor:
        """``x [B, N, C]``, ``context [B, L, C]``, ``context_lengths [B]`` or None (all L rows)."""
        mkd = _integration()
        B, N, C = x.shape
        L = context.shape[1]
        H = self.num_heads
        q = _norm_across_heads(self.q(x).view(B, N, H, C // H), self.norm_q, backend).reshape(B * N, H, C // H)
        k = _norm_across_heads(self.k(context).view(B, L, H, C // H), self.norm_k, backend).reshape(B * L, H, -1)
        v = self.v(context).reshape(B * L, H, C // H)
        cu_q, cu_k = mkd.cross_attention_offsets(N, L, B, context_lengths, device=x.device)
        out = mk.varlen_attention(q, k, v, cu_q, cu_k, N, L, backend=_attn_backend(backend), validate=False)
        return self.o(out.reshape(B, N, C).to(x.dtype))


def _attn_backend(backend: str) -> str:
    return "reference" if backend == "reference" else "auto"


class WanBlock(nn.Module):
    """One Wan block (public ``WanAttentionBlock`` with ``t2v_cross_attn``), module docstring."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: Tensor, e0: Tensor, index: Tensor | None, positions: Tensor, context: Tensor,
                context_lengths: Tensor | None, backend: str) -> Tensor:
        """``x [B, N, C]``; ``e0 [B, 6, C]`` or ``[B, 2, 6, C]`` (t, t0) with ``index [B, N]``."""
        m = self.modulation.float()
        m = (m + e0.float()) if e0.dim() == 3 else (m.unsqueeze(0) + e0.float())
        shift, scale, gate, c_shift, c_scale, c_gate = m.unbind(-2)
        kw = dict(index=index, validate=False, backend=backend)
        y = mk.ada_layer_norm(x, shift, scale, eps=self.eps, **kw)
        a = self.self_attn(y, positions, backend)
        if self.norm3 is None:
            x = mk.gated_residual(x, a, gate, **kw)
            y = x
        else:
            x, y = mk.gated_residual_ada_layer_norm(x, a, gate, None, None, weight=self.norm3.weight,
                                                    bias=self.norm3.bias, eps=self.norm3.eps, **kw)
        a = self.cross_attn(y, context, context_lengths, backend)
        x, y = mk.gated_residual_ada_layer_norm(x, a, None, c_shift, c_scale, eps=self.eps, **kw)
        return mk.gated_residual(x, self.ffn(y).to(x.dtype), c_gate, **kw)


class WanHead(nn.Module):
    """Output head (public ``Head``): modulated LayerNorm, then ``head`` to ``prod(patch) * out_dim``."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor, index: Tensor | None, backend: str) -> Tensor:
        """``x [B, N, C]``, ``e [B, C]`` or ``[B, 2, C]`` (t, t0) -> ``[B, N, prod(patch) * out]``."""
        m = self.modulation.float()
        m = (m + e.float().unsqueeze(1)) if e.dim() == 2 else (m.unsqueeze(0) + e.float().unsqueeze(2))
        shift, scale = m.unbind(-2)
        y = mk.ada_layer_norm(x, shift, scale, index=index, eps=self.eps, validate=False, backend=backend)
        return self.head(y)


class WanDiT(nn.Module):
    """The enhancer's Wan DiT (public ``WanModel``, ``model_type="t2v"``, with ``patch_embedding2``
    and ``t0`` modulation). Parameter names match the public module tree.

    Args:
        cfg: the sizes (:class:`WanConfig`; ``WAN_FLAVORS["1.3b"]`` for the released enhancer).
        kernels: ``True`` / ``"auto"``: the fused ops (Triton on CUDA, the PyTorch reference on a
            plain CPU); ``False`` / ``"reference"``: the references everywhere; ``"triton"``.

    Raises:
        ValueError: a bad ``kernels`` value.
    """

    def __init__(self, cfg: WanConfig = WanConfig(), *, kernels: bool | str = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = resolve_backend(kernels)
        p, d = tuple(cfg.patch_size), cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=p, stride=p)
        self.patch_embedding2 = nn.Conv3d(cfg.in_dim, d, kernel_size=p, stride=p) if cfg.video_condition else None
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)

    def _time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``t [B]`` -> ``(e [B, C], e0 [B, 6, C])``, computed in fp32 whatever the weight dtype (the
        public model runs these layers under fp32 autocast)."""

        def lin(m: nn.Linear, x: Tensor) -> Tensor:
            return nn.functional.linear(x, m.weight.float(), m.bias.float())

        te, tp = self.time_embedding, self.time_projection
        e = lin(te[2], nn.functional.silu(lin(te[0], sinusoidal_embedding(self.cfg.freq_dim, t))))
        e0 = lin(tp[1], nn.functional.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context: Tensor) -> Tensor:
        """Caption features ``[B, L, text_dim]`` (``L <= text_len``) zero-padded to ``text_len``
        rows, through ``text_embedding`` -> ``[B, text_len, dim]``.

        Raises:
            ValueError: wrong rank / width, or more than ``text_len`` rows.
        """
        c = self.cfg
        if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != c.text_dim:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must be [B, L, {c.text_dim}] caption features, got {shape}")
        if context.shape[1] > c.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, more than text_len={c.text_len}")
        pad = c.text_len - context.shape[1]
        if pad:
            context = torch.cat([context, context.new_zeros(context.shape[0], pad, c.text_dim)], dim=1)
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, *, y: Tensor | None = None,
                x_mask: Tensor | None = None, timestep_t0: Tensor | None = None,
                context_lengths: Tensor | None = None) -> Tensor:
        """Velocity prediction (public ``WanModel.forward`` with ``opensora_i2v_enable``).

        Args:
            x: ``[B, in_dim, T, H, W]`` noised latent; T, H, W multiples of the patch.
            timestep: ``[B]`` or a scalar, 0..1000 (``1000 * sigma``).
            context: ``[B, L, text_dim]`` caption features, ``L <= text_len`` (zero-padded to
                ``text_len``; the padded rows are attended unless ``context_lengths`` is given).
            y: ``[B, in_dim, T, H, W]`` the input video's latent, through ``patch_embedding2``
                (models with ``video_condition``); None: not added.
            x_mask: bool ``[T_p]`` (latent frames after patching) or ``[N]`` (tokens): True for
                the tokens modulated with ``timestep_t0`` (public: the first latent frame).
                None: every token uses ``timestep``.
            timestep_t0: ``[B]`` or a scalar; default 0.
            context_lengths: ``[B]`` real caption rows (then the padding is skipped: not the
                public behaviour); None: all ``text_len`` rows.

        Returns:
            ``[B, out_dim, T, H, W]`` fp32.

        Raises:
            ValueError: shapes that do not fit (names the argument), ``y`` given to a model
                without ``patch_embedding2``.
        """
        c = self.cfg
        pt, ph, pw = c.patch_size
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != c.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, {c.in_dim}, T, H, W], got {shape}")
        B, _, T, H, W = x.shape
        if T % pt or H % ph or W % pw:
            raise ValueError(f"x latent size (T, H, W) = {(T, H, W)} must be a multiple of the patch {c.patch_size}")
        f, h, w = T // pt, H // ph, W // pw
        N = f * h * w
        dt = self.patch_embedding.weight.dtype
        tok = self.patch_embedding(x.to(dt))
        if y is not None:
            if self.patch_embedding2 is None:
                raise ValueError("y given, but this model has no patch_embedding2 (video_condition=False)")
            if tuple(y.shape) != tuple(x.shape):
                raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
            tok = tok + self.patch_embedding2(y.to(dt))
        tok = tok.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(B)
        e, e0 = self._time(t)
        index = None
        if x_mask is not None:
            x_mask = torch.as_tensor(x_mask, device=x.device)
            if x_mask.dtype != torch.bool or x_mask.dim() != 1 or x_mask.numel() not in (f, N):
                raise ValueError(f"x_mask must be bool [{f}] (latent frames) or [{N}] (tokens), got "
                                 f"{x_mask.dtype} {tuple(x_mask.shape)}")
            if x_mask.numel() == f and f != N:
                x_mask = x_mask.repeat_interleave(h * w)
            t0 = torch.zeros_like(t) if timestep_t0 is None else torch.as_tensor(timestep_t0, device=x.device)
            e_t0, e0_t0 = self._time(t0.reshape(-1).expand(B).to(t.dtype))
            e, e0 = torch.stack([e, e_t0], 1), torch.stack([e0, e0_t0], 1)
            index = x_mask.to(torch.int32).unsqueeze(0).expand(B, N)
        ctx = self.embed_text(context)
        positions = _integration().wan_video_positions(f, h, w, device=x.device)
        for block in self.blocks:
            tok = block(tok, e0, index, positions, ctx, context_lengths, self.backend)
        out = self.head(tok, e, index, self.backend)  # [B, N, pt*ph*pw*out]
        out = out.reshape(B, f, h, w, pt, ph, pw, c.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, c.out_dim, T, H, W).float()

    def init_weights(self) -> None:
        """The public ``init_weights`` + ``init_condition_weight``: xavier-uniform linears with
        zero bias, normal(0.02) text/time embeddings, a zero output layer and a zero
        ``patch_embedding2`` (so a fresh I2V model starts as the T2V one)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.patch_embedding2 is not None:
            nn.init.zeros_(self.patch_embedding2.weight)
            nn.init.zeros_(self.patch_embedding2.bias)


_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
             "blocks.0.ffn.0.weight", "head.head.weight")


def wan_config_from_state_dict(sd: Mapping[str, Tensor], *, where: str = "state dict",
                               num_heads: int | None = None, text_len: int = 512) -> WanConfig:
    """The :class:`WanConfig` whose parameters have the shapes of ``sd`` (a public ``WanModel``
    state dict). ``dim``/``in_dim``/patch from ``patch_embedding.weight [dim, in, pt, ph, pw]``,
    ``num_layers`` from the highest ``blocks.<i>``, ``ffn_dim``, ``text_dim``, ``freq_dim``,
    ``out_dim`` from their linears, ``cross_attn_norm`` from ``blocks.0.norm3.weight``,
    ``video_condition`` from ``patch_embedding2.weight``. The head count is stored nowhere:
    ``num_heads`` or ``dim / 128`` (Wan2.1's head_dim).

    Raises:
        ValueError: not a Wan DiT state dict (lists what it lacks), the CLIP image branch of
            Wan's I2V-14B (``img_emb``; not supported), or a ``dim`` 128 does not divide and no
            ``num_heads``.
    """
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        found = sorted({k.split(".")[0] for k in sd})
        raise ValueError(f"{where} is not a Wan DiT state dict: it lacks {missing}; found {len(sd)} keys with "
                         f"top-level names {found[:16]}")
    if any(k.startswith("img_emb.") for k in sd):
        raise ValueError(f"{where} has img_emb.* (Wan I2V with CLIP image cross-attention): not supported; "
                         "the enhancer is the T2V model with patch_embedding2")
    pe = sd["patch_embedding.weight"]
    if pe.dim() != 5:
        raise ValueError(f"{where}: patch_embedding.weight must be a 5-D conv weight, got {tuple(pe.shape)}")
    dim, in_dim, *patch = pe.shape
    if num_heads is None:
        if dim % _WAN_HEAD_DIM:
            raise ValueError(f"{where}: dim {dim} is not a multiple of Wan's head_dim {_WAN_HEAD_DIM}: pass num_heads")
        num_heads = dim // _WAN_HEAD_DIM
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit())
    out = sd["head.head.weight"].shape[0]
    if out % math.prod(patch):
        raise ValueError(f"{where}: head.head.weight rows {out} are not a multiple of the patch volume {patch}")
    return WanConfig(dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_heads=num_heads,
                     num_layers=layers, in_dim=in_dim, out_dim=out // math.prod(patch),
                     text_dim=sd["text_embedding.0.weight"].shape[1], text_len=text_len,
                     freq_dim=sd["time_embedding.0.weight"].shape[1], patch_size=tuple(patch),
                     cross_attn_norm="blocks.0.norm3.weight" in sd,
                     video_condition="patch_embedding2.weight" in sd, eps=1e-6)


def load_wan_dit(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kernels: bool | str = True, num_heads: int | None = None, text_len: int = 512) -> WanDiT:
    """The released enhancer DiT (``dit_i2v.safetensors``, or any public ``WanModel`` state dict
    in ``.safetensors``/``.pt``/``.pth``/``.bin``): config from the shapes, a meta build, then the
    weights assigned (``strict=True``) in ``dtype`` on ``device``.

    Raises:
        FileNotFoundError: no such file (names it).
        ValueError: not a Wan DiT state dict; strict loading fails (names the keys).
    """
    from mugv.models.checkpoint import read_state_dict

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"Wan DiT weights not found: {p} (expected the enhancer's dit_i2v.safetensors)")
    sd = read_state_dict(p)
    cfg = wan_config_from_state_dict(sd, where=p, num_heads=num_heads, text_len=text_len)
    with torch.device("meta"):
        model = WanDiT(cfg, kernels=kernels)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{p} does not load strictly into WanDiT({cfg}): {e}") from e
    return model.eval()

