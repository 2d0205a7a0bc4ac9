"""Run diffusers' video models on the ``mugv`` ops with one call, in place.

.. code-block:: python

    from diffusers import WanTransformer3DModel
    from mugv_kernels.integrations.diffusers import apply_mugv_kernels, remove_mugv_kernels

    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    report = apply_mugv_kernels(model)          # what was replaced, what was left alone and why
    out = model(latents, t, text, encoder_attention_mask=text_mask).sample
    remove_mugv_kernels(model)                  # the stock model again

Supported (exact classes, checked at call time together with the diffusers version,
:data:`SUPPORTED_DIFFUSERS`): ``WanTransformer3DModel`` (Wan 2.1 T2V/I2V, Wan 2.2
including per-token timesteps), ``HunyuanVideoTransformer3DModel`` (T2V and the
``token_replace`` I2V variant) and ``AutoencoderKLWan``. Anything else raises before
the model is touched: a patch is all or nothing.

How it hooks in, through diffusers' public extension points only (no edit of diffusers'
source, no global monkey-patching, no new parameters or buffers: the state dict is
unchanged, checkpoints load either way):

- attention: ``model.set_attn_processor`` with :class:`MugvWanAttnProcessor` /
  :class:`MugvHunyuanVideoAttnProcessor`, which keep diffusers' projection modules
  (so peft LoRA adapters on ``to_q``/``to_k``/... keep working) and run the QK norm +
  3D RoPE as one ``mugv`` op and the attention as :func:`mugv_kernels.varlen_attention`;
- norms and modulation: the forward of each transformer block (and of the Wan
  model, for the index-form timesteps, caption lengths and output norm) is replaced by a
  diffusers ``ModelHook`` (``diffusers.hooks.HookRegistry``, the mechanism of diffusers'
  own caches), which calls the block's own submodules and the fused adaLN ops;
- RoPE: the model's rotary module returns integer token positions ``[N, 3]`` instead of
  cos/sin tables (the angles are computed inside the kernel);
- Wan VAE: every ``WanCausalConv3d`` runs :func:`mugv_kernels.causal_conv3d`, its
  cache of previous frames passed as ``context``.

Apply it before ``fully_shard``, activation checkpointing wrappers, ``torch.compile`` and
other diffusers hooks (a module that already has a diffusers hook or an instance
``forward`` raises); peft adapters may be added before or after.

Math checked against the stock models (outputs and every parameter gradient, fp32):
Wan: ``transformer_wan.py`` (``WanTransformerBlock``, ``WanAttnProcessor``,
``WanRotaryPosEmbed``); HunyuanVideo: ``transformer_hunyuan_video.py``; VAE:
``autoencoder_kl_wan.py`` of diffusers. Both transformers use the interleaved RoPE pair
layout (pairs ``(2j, 2j+1)``, diffusers' ``repeat_interleave_real=True`` tables) with
uneven sections in the order (t, h, w): Wan ``(D - 4 (D // 6), 2 (D // 6), 2 (D // 6))``,
``(44, 42, 42)`` at head_dim 128, theta 1e4; HunyuanVideo ``rope_axes_dim``,
``(16, 56, 56)``, theta 256.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

import mugv_kernels as mk

try:
    import diffusers
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models import AutoencoderKLWan, HunyuanVideoTransformer3DModel, WanTransformer3DModel
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.normalization import FP32LayerNorm, RMSNorm
    from diffusers.models.transformers import transformer_hunyuan_video as _hv
    from diffusers.models.transformers import transformer_wan as _wan
    from diffusers.utils import apply_lora_scale
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mugv_kernels.integrations.diffusers needs diffusers: pip install 'mugv[diffusers]'"
    ) from e

__all__ = [
    "SUPPORTED_DIFFUSERS",
    "MugvHunyuanVideoAttnProcessor",
    "MugvWanAttnProcessor",
    "Report",
    "apply_mugv_kernels",
    "cross_attention_offsets",
    "joint_attention_offsets",
    "qk_norm_across_heads_rope3d",
    "remove_mugv_kernels",
    "rms_norm_across_heads",
    "wan_block_forward",
    "wan_rope_sections",
    "wan_video_positions",
]

SUPPORTED_DIFFUSERS: tuple[tuple[int, int], ...] = ((0, 42),)
"""diffusers releases (major, minor) this integration is tested with (any patch level);
the ``diffusers`` extra of ``pyproject.toml`` pins the same range."""

HOOK_NAME = "mugv_kernels"
"""Name of the diffusers hooks this module registers."""

WAN_TEXT_LEN = 512
"""Caption tokens Wan's I2V cross-attention expects after the image tokens (diffusers'
``WanAttnProcessor`` splits ``encoder_hidden_states`` at ``len - 512``)."""

WAN_ROPE_THETA = 10000.0
"""RoPE base of ``WanRotaryPosEmbed`` as ``WanTransformer3DModel`` builds it."""


# ----------------------------------------------------------------------------------------
# Reusable pieces (also for Wan-shaped models of our own)
# ----------------------------------------------------------------------------------------


def wan_rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Wan's 3D RoPE sections ``(t, h, w)`` for a head dim: ``h = w = 2 * (D // 6)``,
    ``t = D - h - w`` (``WanRotaryPosEmbed``; ``(44, 42, 42)`` for D = 128).

    Raises:
        ValueError: D not a positive even int.
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


def wan_video_positions(frames: int, height: int, width: int, *, device=None) -> Tensor:
    """Integer positions ``[frames * height * width, 3]`` (int32, columns (t, h, w)) of
    the patch tokens of a latent video in diffusers' token order (frame-major, then row,
    then column: ``patch_embedding(x).flatten(2)``), 0-based. Used by Wan and
    HunyuanVideo (no start/end tokens, unlike :func:`mugv_kernels.video_positions`)."""
    return mk.video_positions(frames, height, width, start_end_tokens=False, order=("t", "h", "w"), device=device)


_NO_ROTATION = (0, 0, 0)


def rms_norm_across_heads(x: Tensor, weight: Tensor | None, eps: float, heads: int) -> Tensor:
    """RMSNorm over the whole channel axis of ``x [B, N, C]`` (``C = heads * head_dim``,
    statistics in fp32): Wan's ``norm_q``/``norm_k`` of the cross-attention
    (``torch.nn.RMSNorm(H * D)``, the ``rms_norm_across_heads`` QK norm), as
    :func:`mugv_kernels.qk_norm_rope3d` with ``across_heads=True`` on one tensor and no
    rotation.

    Args:
        x: ``[B, N, C]`` fp32/bf16/fp16.
        weight: ``[C]`` or None (then ``x`` is returned as it is).
        eps: added to the mean square.
        heads: H (C must be a multiple).

    Returns:
        ``[B, N, H, C // H]`` in ``x.dtype``.

    Raises:
        TypeError / ValueError: as :func:`mugv_kernels.qk_norm_rope3d`.
    """
    x4 = x.unflatten(-1, (heads, -1))
    if weight is None:
        return x4
    pos = torch.zeros(x.shape[1], 3, dtype=torch.int32, device=x.device)
    return mk.qk_norm_rope3d(
        x4, None, pos, _NO_ROTATION, q_weight=weight, eps=eps, across_heads=True, check_positions=False
    )[0]


def qk_norm_across_heads_rope3d(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    sections: tuple[int, int, int],
    *,
    q_weight: Tensor | None,
    k_weight: Tensor | None,
    eps: float,
    theta: float = WAN_ROPE_THETA,
    interleaved: bool = True,
) -> tuple[Tensor, Tensor]:
    """Wan's QK norm and 3D RoPE of self-attention in one kernel: RMSNorm of q and k over
    all heads (``H * D`` channels, not per head), then the rotation of each head
    (:func:`mugv_kernels.qk_norm_rope3d` with ``across_heads=True``).

    Args:
        q, k: ``[B, N, H, D]`` (the projections viewed as heads), same shape and dtype.
        positions: int32/int64 ``[N, 3]`` or ``[B, N, 3]`` (columns in section order;
            :func:`wan_video_positions`).
        sections: three even ints (Wan: :func:`wan_rope_sections`, t/h/w).
        q_weight, k_weight: ``[H * D]`` RMSNorm weights or None.
        eps: RMSNorm epsilon (Wan: 1e-6).
        theta: RoPE base (Wan: 1e4).
        interleaved: pair layout, True for Wan (pairs ``(2j, 2j+1)``).

    Returns:
        ``(q_out, k_out)`` ``[B, N, H, D]`` in the input dtype.

    Raises:
        TypeError / ValueError: as :func:`mugv_kernels.qk_norm_rope3d`.
    """
    if q.dim() != 4:
        raise ValueError(f"q and k must be [B, N, H, D], got {tuple(q.shape)}")
    return mk.qk_norm_rope3d(
        q, k, positions, sections, q_weight=q_weight, k_weight=k_weight, eps=eps, theta=theta,
        interleaved=interleaved, check_positions=False, across_heads=True,
    )  # fmt: skip


def _offsets(lengths: Tensor) -> Tensor:
    """``[S]`` segment lengths -> ``[S + 1]`` int32 offsets starting at 0 (no host sync)."""
    return torch.nn.functional.pad(lengths.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def cross_attention_offsets(
    n_queries: int, n_keys: int, batch: int, key_lengths: Tensor | None, device=None
) -> tuple[Tensor, Tensor]:
    """``cu_seqlens`` for cross-attention of ``[B, Nq]`` queries to ``[B, Nk]`` padded
    keys, packed as ``[B * Nq]`` and ``[B * Nk]`` rows, where sample ``b`` uses only its
    first ``key_lengths[b]`` keys. The padded keys of each sample are put in a segment of
    their own with no queries, so they are skipped without a gather, a mask or a host
    sync (2B segments). ``key_lengths=None``: all keys (B segments).

    Returns:
        ``(cu_seqlens_q, cu_seqlens_k)`` int32 for :func:`mugv_kernels.varlen_attention`.
    """
    dev = device if key_lengths is None else key_lengths.device
    if key_lengths is None:
        ar = torch.arange(batch + 1, device=dev, dtype=torch.int32)
        return ar * n_queries, ar * n_keys
    lk = key_lengths.to(torch.int32).clamp(0, n_keys)
    q = torch.stack([torch.full_like(lk, n_queries), torch.zeros_like(lk)], 1).flatten()
    k = torch.stack([lk, n_keys - lk], 1).flatten()
    return _offsets(q), _offsets(k)


def joint_attention_offsets(seq_len: int, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``cu_seqlens`` for joint self-attention over ``[B, S]`` packed as ``[B * S]`` rows
    where sample ``b``'s first ``valid[b]`` tokens (video + real caption tokens) attend to
    each other and its padded caption tokens are dropped: they get their own segment with
    no keys (zero output rows) and their keys a segment with no queries (3B segments, no
    host sync).

    Returns:
        ``(cu_seqlens_q, cu_seqlens_k)`` int32.
    """
    n = valid.to(torch.int32).clamp(0, seq_len)
    pad = seq_len - n
    zero = torch.zeros_like(n)
    q = torch.stack([n, pad, zero], 1).flatten()
    k = torch.stack([n, zero, pad], 1).flatten()
    return _offsets(q), _offsets(k)


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, backend: str):
    """``[B, Nq, H, D]`` x ``[B, Nk, H, D]`` -> ``[B, Nq, H * D]`` through varlen_attention."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    out = mk.varlen_attention(
        q.reshape(B * Nq, H, D), k.reshape(B * Nk, H, D), v.reshape(B * Nk, H, D),
        cu_q, cu_k, max_q, max_k, backend=backend, validate=False,
    )  # fmt: skip
    return out.reshape(B, Nq, H * D)


def _is_positions(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dtype in (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------
# Attention processors
# ----------------------------------------------------------------------------------------


class MugvWanAttnProcessor:
    """Attention processor for ``WanAttention`` (diffusers' ``WanAttnProcessor`` math).

    Self-attention (``attn1``): ``to_q/to_k/to_v`` -> RMSNorm of q and k over all heads
    + 3D RoPE (:func:`qk_norm_across_heads_rope3d`, when ``rope``) -> attention over
    each sample's tokens (:func:`mugv_kernels.varlen_attention`, when ``attention``) ->
    ``to_out``. Cross-attention (``attn2``): q/k RMSNorm over all heads, attention to the
    caption tokens, skipping each sample's padded ones when ``encoder_lengths [B]`` is
    given (:func:`cross_attention_offsets`), plus the image-token attention of the I2V
    models (``add_k_proj``; the last 512 context tokens are the caption, as in diffusers).

    Args:
        rope: run the QK norm (+ RoPE) on ``mugv`` ops; False uses the module's own
            ``norm_q``/``norm_k`` and diffusers' ``apply_rotary_emb`` on cos/sin tables.
        attention: run attention on :func:`mugv_kernels.varlen_attention`; False uses
            diffusers' ``dispatch_attention_fn`` (caption lengths then become a key mask).
        backend: the varlen backend (``"auto"``, ``"flash"``, ``"native"``, ``"flex"``,
            ``"triton"``, ``"sdpa"``, ``"reference"``).

    Call signature: that of ``WanAttnProcessor`` plus ``encoder_lengths`` (int ``[B]``,
    real caption tokens per sample; they must come first). ``rotary_emb`` is either
    diffusers' ``(cos, sin)`` or int positions ``[N, 3]`` (t, h, w) from the patched
    rotary module; the sections are read from the head dim (:func:`wan_rope_sections`).

    Raises:
        ValueError: an ``attention_mask`` (use ``encoder_lengths``), rope on with cos/sin
            tables instead of positions.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, *, rope: bool = True, attention: bool = True, backend: str = "auto"):
        self.rope = rope
        self.attention = attention
        self.backend = backend

    def _attend(self, q, k, v, key_lengths):
        B, Nq = q.shape[:2]
        Nk = k.shape[1]
        if self.attention:
            cu_q, cu_k = cross_attention_offsets(Nq, Nk, B, key_lengths, device=q.device)
            return _varlen(q, k, v, cu_q, cu_k, Nq, Nk, self.backend)
        mask = None
        if key_lengths is not None:
            mask = (torch.arange(Nk, device=q.device)[None, :] < key_lengths[:, None])[:, None, None, :]
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend)
        return out.flatten(2, 3).type_as(q)

    def _norm(self, attn, x, norm):
        """``[B, N, C]`` -> normalized ``[B, N, H, D]``."""
        if self.rope:
            return rms_norm_across_heads(x, norm.weight, norm.eps, attn.heads)
        return norm(x).unflatten(2, (attn.heads, -1))

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: Any = None,
        encoder_lengths: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError(
                "MugvWanAttnProcessor takes caption lengths (encoder_lengths / the model's "
                "encoder_attention_mask), not an attention_mask"
            )
        H = attn.heads
        if encoder_hidden_states is None:  # self-attention
            if getattr(attn, "fused_projections", False):
                q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if self.rope:
                if rotary_emb is not None and not _is_positions(rotary_emb):
                    raise ValueError("rope=True needs int positions [N, 3] from the patched rotary module")
                q4, k4 = q.unflatten(2, (H, -1)), k.unflatten(2, (H, -1))
                if rotary_emb is None:
                    q, k = self._norm(attn, q, attn.norm_q), self._norm(attn, k, attn.norm_k)
                else:
                    q, k = qk_norm_across_heads_rope3d(
                        q4, k4, rotary_emb, wan_rope_sections(q4.shape[-1]),
                        q_weight=attn.norm_q.weight, k_weight=attn.norm_k.weight, eps=attn.norm_q.eps,
                    )  # fmt: skip
            else:
                q = attn.norm_q(q).unflatten(2, (H, -1))
                k = attn.norm_k(k).unflatten(2, (H, -1))
                if rotary_emb is not None:  # Wan's tables are [1, N, 1, D] (repeat-interleaved)
                    tables = tuple(t.reshape(t.shape[1], t.shape[-1]) for t in rotary_emb)
                    q = apply_rotary_emb(q, tables, sequence_dim=1).type_as(q)
                    k = apply_rotary_emb(k, tables, sequence_dim=1).type_as(k)
            v = v.unflatten(2, (H, -1))
            out = self._attend(q, k, v, None)
        else:  # cross-attention to [image tokens,] caption tokens
            img = None
            if attn.add_k_proj is not None:
                n_img = encoder_hidden_states.shape[1] - WAN_TEXT_LEN
                img = encoder_hidden_states[:, :n_img]
                encoder_hidden_states = encoder_hidden_states[:, n_img:]
            if getattr(attn, "fused_projections", False):
                q = attn.to_q(hidden_states)
                k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            q = self._norm(attn, q, attn.norm_q)
            k = self._norm(attn, k, attn.norm_k)
            out = self._attend(q, k, v.unflatten(2, (H, -1)), encoder_lengths)
            if img is not None:
                if getattr(attn, "fused_projections", False):
                    k_img, v_img = attn.to_added_kv(img).chunk(2, dim=-1)
                else:
                    k_img, v_img = attn.add_k_proj(img), attn.add_v_proj(img)
                k_img = self._norm(attn, k_img, attn.norm_added_k)
                out = out + self._attend(q, k_img, v_img.unflatten(2, (H, -1)), None)
        out = attn.to_out[0](out.type_as(hidden_states))
        return attn.to_out[1](out)


class MugvHunyuanVideoAttnProcessor:
    """Attention processor for HunyuanVideo's dual- and single-stream blocks
    (diffusers' ``HunyuanVideoAttnProcessor2_0`` math).

    Per-head RMSNorm of q/k and 3D RoPE of the video tokens in one
    :func:`mugv_kernels.qk_norm_rope3d` call (caption tokens take position (0, 0, 0), a
    rotation by 0: norm only; the dual-stream caption projections, with their own
    ``norm_added_q/k``, in a second call), then joint video + caption attention packed
    per sample where each sample's padded caption tokens are dropped, not masked
    (:func:`joint_attention_offsets`): their rows come out as zeros, and they are never
    keys. diffusers' mask ``[B, 1, 1, S]`` is read only for its per-sample count of
    valid tokens (it is a prefix mask: video, then the real caption tokens).

    Args:
        sections, theta: the model's ``rope_axes_dim`` and ``rope_theta``.
        rope, attention, backend: as :class:`MugvWanAttnProcessor`.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        sections: tuple[int, int, int],
        theta: float,
        *,
        rope: bool = True,
        attention: bool = True,
        backend: str = "auto",
    ):
        self.sections = tuple(sections)
        self.theta = float(theta)
        self.rope = rope
        self.attention = attention
        self.backend = backend

    def _qk(self, q, k, norm_q, norm_k, positions):
        return mk.qk_norm_rope3d(
            q, k, positions, self.sections, q_weight=norm_q.weight, k_weight=norm_k.weight,
            eps=norm_q.eps, theta=self.theta, interleaved=True, check_positions=False,
        )  # fmt: skip

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[Tensor, Tensor]:
        H = attn.heads
        single = attn.add_q_proj is None and encoder_hidden_states is not None
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q = attn.to_q(hidden_states).unflatten(2, (H, -1))
        k = attn.to_k(hidden_states).unflatten(2, (H, -1))
        v = attn.to_v(hidden_states).unflatten(2, (H, -1))
        S = q.shape[1]
        if self.rope:
            if image_rotary_emb is not None and not _is_positions(image_rotary_emb):
                raise ValueError("rope=True needs int positions [N, 3] from the patched rotary module")
            n_vid = S - n_txt if single else S
            pos = image_rotary_emb
            if pos is None:
                pos = torch.zeros(n_vid, 3, dtype=torch.int32, device=q.device)
            if single:
                pos = torch.cat([pos.to(torch.int32), pos.new_zeros(n_txt, 3, dtype=torch.int32)])
            q, k = self._qk(q, k, attn.norm_q, attn.norm_k, pos)
        else:
            q, k = attn.norm_q(q), attn.norm_k(k)
            if image_rotary_emb is not None:
                if single:
                    q = torch.cat([apply_rotary_emb(q[:, :-n_txt], image_rotary_emb, sequence_dim=1), q[:, -n_txt:]], 1)
                    k = torch.cat([apply_rotary_emb(k[:, :-n_txt], image_rotary_emb, sequence_dim=1), k[:, -n_txt:]], 1)
                else:
                    q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                    k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (H, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (H, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (H, -1))
            if self.rope:
                zeros = torch.zeros(n_txt, 3, dtype=torch.int32, device=q.device)
                eq, ek = self._qk(eq, ek, attn.norm_added_q, attn.norm_added_k, zeros)
            else:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)
        B, S = q.shape[:2]
        if self.attention:
            if attention_mask is None:
                valid = torch.full((B,), S, dtype=torch.int32, device=q.device)
            else:
                bad = attention_mask.dtype != torch.bool or attention_mask.shape[-1] != S
                if bad or attention_mask.numel() != B * S:
                    raise ValueError(
                        f"attention_mask must be diffusers' bool prefix mask [B, 1, 1, S] = {(B, 1, 1, S)}, "
                        f"got {tuple(attention_mask.shape)} {attention_mask.dtype}"
                    )
                valid = attention_mask.reshape(B, S).sum(1, dtype=torch.int32)
            cu_q, cu_k = joint_attention_offsets(S, valid)
            out = _varlen(q, k, v, cu_q, cu_k, S, S, self.backend)
        else:
            out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend)
            out = out.flatten(2, 3)
        out = out.to(q.dtype)
        if encoder_hidden_states is not None:
            out, ctx = out[:, :-n_txt], out[:, -n_txt:]
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            if getattr(attn, "to_add_out", None) is not None:
                ctx = attn.to_add_out(ctx)
            return out, ctx
        return out, encoder_hidden_states


# ----------------------------------------------------------------------------------------
# Block / model forwards (diffusers hooks)
# ----------------------------------------------------------------------------------------


def _modulation(table: Tensor, temb: Tensor) -> list[Tensor]:
    """``table [1, K, C] + temb`` split into K parts: ``[B, K, C]`` -> K x ``[B, C]``;
    ``[B, G, K, C]`` (index form) -> K x ``[B, G, C]``."""
    if temb.dim() == 3:
        return list((table + temb.float()).unbind(1))
    return list((table.unsqueeze(0) + temb.float()).unbind(2))


def wan_block_forward(
    block: nn.Module,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    rotary_emb: Any,
    temb_index: Tensor | None = None,
    encoder_lengths: Tensor | None = None,
) -> Tensor:
    """A ``WanTransformerBlock`` on fused adaLN ops (``WanTransformerBlock.forward`` math):
    ``ada_layer_norm`` -> ``attn1`` -> ``gated_residual_ada_layer_norm`` (gate, then
    ``norm2``'s affine LayerNorm) -> ``attn2`` -> ``gated_residual_ada_layer_norm`` (plain
    residual, ``norm3`` modulated) -> ``ffn`` -> ``gated_residual``.

    Args:
        block: the stock block (its submodules and ``scale_shift_table`` are used).
        hidden_states: ``[B, N, C]``.
        encoder_hidden_states: ``[B, L, C]`` context (I2V: image tokens, then 512 caption).
        temb: ``[B, 6, C]`` (one timestep per sample) or ``[B, G, 6, C]`` with
            ``temb_index [B, N]`` in ``[0, G)`` choosing each token's set (Wan 2.2's
            per-token timesteps, one row per distinct timestep).
        rotary_emb: passed to ``attn1`` (positions ``[N, 3]`` or cos/sin tables).
        encoder_lengths: ``[B]`` real caption tokens per sample, or None (all).

    Returns:
        ``[B, N, C]`` in ``hidden_states.dtype``.
    """
    shift, scale, gate, c_shift, c_scale, c_gate = _modulation(block.scale_shift_table, temb)
    idx = temb_index
    if temb.dim() == 4 and idx is None:  # diffusers' per-token form [B, N, 6, C]: token n takes row n
        B, N = hidden_states.shape[:2]
        idx = torch.arange(N, device=hidden_states.device, dtype=torch.int32).expand(B, N)
    kw = dict(index=idx, validate=False)
    y = mk.ada_layer_norm(hidden_states, shift, scale, eps=block.norm1.eps, **kw)
    a = block.attn1(y, None, None, rotary_emb)
    if isinstance(block.norm2, nn.Identity):
        x = mk.gated_residual(hidden_states, a, gate, **kw)
        y = x
    else:
        n2 = block.norm2
        x, y = mk.gated_residual_ada_layer_norm(
            hidden_states, a, gate, None, None, weight=n2.weight, bias=n2.bias, eps=n2.eps, **kw
        )
    a = block.attn2(y, encoder_hidden_states, None, None, encoder_lengths=encoder_lengths)
    x, y = mk.gated_residual_ada_layer_norm(x, a, None, c_shift, c_scale, eps=block.norm3.eps, **kw)
    return mk.gated_residual(x, block.ffn(y).to(x.dtype), c_gate, **kw)


def _text_lengths(mask: Tensor | None, B: int, L: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, L):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"encoder_attention_mask must be [B, L] = {(B, L)} (1 = caption token), got {shape}")
    lengths = (mask != 0).sum(1, dtype=torch.int32)
    if not torch.compiler.is_compiling():
        prefix = torch.arange(L, device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask != 0):
            raise ValueError("encoder_attention_mask must mark a prefix of each caption (padding at the end)")
    return lengths


@apply_lora_scale("attention_kwargs")
def _wan_model_forward(
    model,
    hidden_states: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    encoder_hidden_states_image: Tensor | None = None,
    return_dict: bool = True,
    attention_kwargs: dict | None = None,
    encoder_attention_mask: Tensor | None = None,
):
    """``WanTransformer3DModel.forward`` with the fused blocks, plus
    ``encoder_attention_mask [B, L]`` (1 for caption tokens, a prefix of each row): the
    cross-attention then skips each sample's padding. Per-token timesteps ``[B, N]`` are
    embedded once per distinct value and selected by index (one ``torch.unique``; a
    graph break under ``torch.compile`` of the whole model, none in the blocks)."""
    B, _, F_, H_, W_ = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    f, h, w = F_ // p_t, H_ // p_h, W_ // p_w
    N = f * h * w
    rotary_emb = model.rope(hidden_states)
    lengths = _text_lengths(encoder_attention_mask, B, encoder_hidden_states.shape[1])
    x = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    index = None
    if timestep.dim() == 2:
        if tuple(timestep.shape) != (B, N):
            raise ValueError(f"per-token timestep must be [B, N] = {(B, N)}, got {tuple(timestep.shape)}")
        values, index = torch.unique(timestep, return_inverse=True)
        temb, proj, context, context_img = model.condition_embedder(
            values, encoder_hidden_states, encoder_hidden_states_image
        )
        G = values.shape[0]
        temb = temb.unsqueeze(0).expand(B, G, -1)
        proj = proj.unflatten(1, (6, -1)).unsqueeze(0).expand(B, G, 6, -1)
        index = index.to(torch.int32)
    else:
        temb, proj, context, context_img = model.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        proj = proj.unflatten(1, (6, -1))
    if context_img is not None:
        context = torch.cat([context_img, context], dim=1)
    for block in model.blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            x = model._gradient_checkpointing_func(block, x, context, proj, rotary_emb, index, lengths)
        else:
            x = block(x, context, proj, rotary_emb, index, lengths)
    table = model.scale_shift_table.to(temb.device)
    if temb.dim() == 3:  # [B, G, C]
        shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)
    else:
        shift, scale = (table + temb.unsqueeze(1)).unbind(1)
    x = mk.ada_layer_norm(x, shift, scale, index=index, eps=model.norm_out.eps, validate=False)
    x = model.proj_out(x)
    x = x.reshape(B, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _hv_modulation(
    norm, temb: Tensor, token_replace_emb: Tensor | None, num_tokens: int | None, n: int, replace_cls: type
) -> tuple[Tensor, Tensor | None]:
    """A HunyuanVideo block's adaLN modulation ``[B, k*C]`` from ``norm.linear(silu(temb))``.
    For the ``TokenReplace`` (I2V) norms with ``token_replace_emb`` given: both sets stacked
    ``[B, 2, k*C]`` and the int32 ``index [B, n]`` that picks set 1 for the first
    ``num_tokens`` tokens (the clean first frame) and set 0 elsewhere; otherwise no index."""
    emb = norm.linear(norm.silu(temb))
    if token_replace_emb is None or not isinstance(norm, replace_cls):
        return emb, None
    emb = torch.stack([emb, norm.linear(norm.silu(token_replace_emb))], 1)
    index = (torch.arange(n, device=emb.device) < num_tokens).to(torch.int32).expand(emb.shape[0], n)
    return emb, index


def _hv_dual_block_forward(
    block,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    attention_mask: Tensor | None = None,
    freqs_cis: Any = None,
    token_replace_emb: Tensor | None = None,
    num_tokens: int | None = None,
    *args,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """HunyuanVideo dual-stream block (``HunyuanVideoTransformerBlock`` and its
    ``TokenReplace`` I2V variant) on fused adaLN ops: per stream ``ada_layer_norm`` ->
    joint attention -> ``gated_residual_ada_layer_norm`` -> FFN -> ``gated_residual``.
    The I2V first-frame tokens take the ``token_replace_emb`` modulation through the
    ``index`` form (G = 2), not by slicing and concatenating."""
    n1 = block.norm1
    emb, index = _hv_modulation(
        n1, temb, token_replace_emb, num_tokens, hidden_states.shape[1], _hv.HunyuanVideoTokenReplaceAdaLayerNormZero
    )
    shift, scale, gate, shift2, scale2, gate2 = emb.chunk(6, dim=-1)
    cn = block.norm1_context
    c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = cn.linear(cn.silu(temb)).chunk(6, dim=-1)
    kw = dict(index=index, validate=False)
    y = mk.ada_layer_norm(hidden_states, shift, scale, eps=n1.norm.eps, **kw)
    cy = mk.ada_layer_norm(encoder_hidden_states, c_shift, c_scale, eps=cn.norm.eps)
    a, ca = block.attn(
        hidden_states=y, encoder_hidden_states=cy, attention_mask=attention_mask, image_rotary_emb=freqs_cis
    )
    x, y = mk.gated_residual_ada_layer_norm(hidden_states, a, gate, shift2, scale2, eps=block.norm2.eps, **kw)
    c, cy = mk.gated_residual_ada_layer_norm(
        encoder_hidden_states, ca, c_gate, c_shift2, c_scale2, eps=block.norm2_context.eps
    )
    x = mk.gated_residual(x, block.ff(y), gate2, **kw)
    c = mk.gated_residual(c, block.ff_context(cy), c_gate2)
    return x, c


def _hv_single_block_forward(
    block,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    attention_mask: Tensor | None = None,
    image_rotary_emb: Any = None,
    token_replace_emb: Tensor | None = None,
    num_tokens: int | None = None,
    *args,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """HunyuanVideo single-stream block (and its ``TokenReplace`` variant):
    ``ada_layer_norm`` of the joint sequence -> attention and MLP in parallel ->
    ``proj_out`` -> ``gated_residual`` (I2V first-frame tokens: index form, G = 2)."""
    L = encoder_hidden_states.shape[1]
    x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    nrm = block.norm
    emb, index = _hv_modulation(
        nrm, temb, token_replace_emb, num_tokens, x.shape[1], _hv.HunyuanVideoTokenReplaceAdaLayerNormZeroSingle
    )
    shift, scale, gate = emb.chunk(3, dim=-1)
    y = mk.ada_layer_norm(x, shift, scale, eps=nrm.norm.eps, index=index, validate=False)
    mlp = block.act_mlp(block.proj_mlp(y))
    a, ca = block.attn(
        hidden_states=y[:, :-L], encoder_hidden_states=y[:, -L:], attention_mask=attention_mask,
        image_rotary_emb=image_rotary_emb,
    )  # fmt: skip
    out = block.proj_out(torch.cat([torch.cat([a, ca], dim=1), mlp], dim=2))
    x = mk.gated_residual(x, out, gate, index=index, validate=False)
    return x[:, :-L], x[:, -L:]


def _rope_positions_forward(module, hidden_states: Tensor) -> Tensor:
    """Patched rotary module: int32 positions ``[N, 3]`` (t, h, w) of the patch tokens."""
    _, _, F_, H_, W_ = hidden_states.shape
    if isinstance(module, _wan.WanRotaryPosEmbed):
        p_t, p_h, p_w = module.patch_size
    else:
        p_t, p_h, p_w = module.patch_size_t, module.patch_size, module.patch_size
    return wan_video_positions(F_ // p_t, H_ // p_h, W_ // p_w, device=hidden_states.device)


def _causal_conv_forward(module, x: Tensor, cache_x: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``WanCausalConv3d.forward`` on :func:`mugv_kernels.causal_conv3d`: the cached
    previous frames (``cache_x``, up to ``P = kT - 1``; fewer are completed with the
    zero padding) become ``context``. A conv without time padding (the downsampling
    ``time_conv``) is the causal conv of ``x[:, :, P:]`` with ``x[:, :, :P]`` as context."""
    kT = module.kernel_size[0]
    P = kT - 1
    if module._padding[4] == 0 and P > 0:  # valid in time
        ctx, x = x[:, :, :P], x[:, :, P:]
    else:
        ctx = None
        if cache_x is not None and P > 0:
            ctx = cache_x.to(x.device)
            c = ctx.shape[2]
            if c > P:
                ctx = ctx[:, :, c - P :]
            elif c < P:
                ctx = torch.cat([ctx.new_zeros(*ctx.shape[:2], P - c, *ctx.shape[3:]), ctx], dim=2)
    return mk.causal_conv3d(
        x, module.weight, module.bias, stride=module.stride, context=ctx, backend=backend
    )


class _ForwardHook(ModelHook):
    """A diffusers hook whose ``new_forward`` is ``fn(module, *args, **kwargs)``."""

    def __init__(self, fn: Callable, **options):
        super().__init__()
        self.fn = fn
        self.options = options

    def new_forward(self, module, *args, **kwargs):
        return self.fn(module, *args, **kwargs, **self.options)


# ----------------------------------------------------------------------------------------
# Report and planning
# ----------------------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`apply_mugv_kernels` did to a model.

    Attributes:
        model: the model's class name.
        diffusers_version: the installed diffusers version.
        options: the ``attention/norms/rope/backend`` arguments.
        replaced: ``{module name: what runs now}`` ("" is the model itself).
        left_alone: ``{module name: why it runs as in diffusers}``. Every named module of
            the model is in exactly one of the two dicts.
    """

    model: str
    diffusers_version: str
    options: dict[str, Any]
    replaced: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"mugv kernels on {self.model} (diffusers {self.diffusers_version}, {self.options}): "
            f"{len(self.replaced)} modules replaced, {len(self.left_alone)} left alone"
        ]
        lines += [f"  replaced    {name or '<model>'}: {what}" for name, what in self.replaced.items()]
        lines += [f"  left alone  {name or '<model>'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


@dataclass
class _Patch:
    report: Report
    hooks: list[tuple[nn.Module, ModelHook]] = field(default_factory=list)
    processors: dict[str, Any] | None = None  # name -> processor to set
    original_processors: dict[str, Any] | None = None


def _diffusers_version() -> str:
    version = diffusers.__version__
    m = re.match(r"(\d+)\.(\d+)\.(\d+)$", version)
    if m is None or (int(m[1]), int(m[2])) not in SUPPORTED_DIFFUSERS:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_DIFFUSERS)
        raise RuntimeError(
            f"mugv_kernels.integrations.diffusers is tested with diffusers {supported}; found {version}. "
            "Install a supported release (pip install 'mugv[diffusers]')."
        )
    return version


def _check_hookable(name: str, module: nn.Module) -> None:
    reg = getattr(module, "_diffusers_hook", None)
    if reg is not None and reg.hooks:
        raise ValueError(
            f"{name or '<model>'} already has diffusers hooks {list(reg.hooks)}: apply mugv kernels before "
            "enabling caches, offloading or layerwise casting"
        )
    fwd = vars(module).get("forward")
    if fwd is not None and not (getattr(fwd, "__func__", None) is type(module).forward and fwd.__self__ is module):
        raise ValueError(
            f"{name or '<model>'} has an instance forward already (another patch?): apply mugv kernels first"
        )


def _hook(patch: _Patch, name: str, module: nn.Module, fn: Callable, what: str, **options) -> None:
    _check_hookable(name, module)
    patch.hooks.append((module, _ForwardHook(fn, **options)))
    patch.report.replaced[name] = what


def _check_rms(name: str, norm: nn.Module, size: int) -> None:
    ok = (
        isinstance(norm, (nn.RMSNorm, RMSNorm))
        and norm.weight is not None
        and getattr(norm, "bias", None) is None
        and tuple(norm.weight.shape) == (size,)
        and isinstance(norm.eps, float)
    )
    if not ok:
        raise ValueError(f"{name}: expected an RMSNorm over {size} channels with a weight and eps, got {norm}")


def _plan_wan(model, patch: _Patch, attention: bool, norms: bool, rope: bool, backend: str) -> None:
    rep = patch.report
    cfg = model.config
    D = cfg.attention_head_dim
    rope_mod = model.rope
    if rope:
        if type(rope_mod) is not _wan.WanRotaryPosEmbed:
            raise ValueError(f"rope: expected WanRotaryPosEmbed, got {type(rope_mod).__name__}")
        if (rope_mod.t_dim, rope_mod.h_dim, rope_mod.w_dim) != wan_rope_sections(D):
            secs = (rope_mod.t_dim, rope_mod.h_dim, rope_mod.w_dim)
            raise ValueError(f"rope: sections {secs} != Wan's {wan_rope_sections(D)} for head_dim {D}")
        table = rope_mod.freqs_cos
        if table.device.type != "meta" and table.shape[0] > 1 and rope_mod.t_dim >= 4:
            want = torch.cos(torch.tensor(WAN_ROPE_THETA, dtype=torch.float64) ** (-2.0 / rope_mod.t_dim))
            if abs(float(table[1, 2]) - float(want)) > 1e-5:
                raise ValueError("rope: the cos table was not built with theta = 1e4 (unsupported)")
        _hook(patch, "rope", rope_mod, _rope_positions_forward, "int positions [N, 3] (t, h, w) for the fused RoPE")
    else:
        rep.left_alone["rope"] = "rope=False: diffusers' cos/sin tables"
    if norms:
        _hook(
            patch, "", model, _wan_model_forward,
            "forward: per-token timesteps in index form, encoder_attention_mask -> caption lengths, "
            "norm_out + scale_shift_table on ada_layer_norm",
        )  # fmt: skip
        rep.replaced["norm_out"] = "ada_layer_norm (with the model's scale_shift_table)"
    else:
        rep.left_alone[""] = "norms=False: diffusers' forward (no caption lengths, per-token timesteps materialized)"
        rep.left_alone["norm_out"] = "norms=False"
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}"
        if type(block) is not _wan.WanTransformerBlock:
            raise ValueError(f"{name}: expected WanTransformerBlock, got {type(block).__name__}")
        if norms:
            _hook(patch, name, block, wan_block_forward, "fused adaLN block forward (wan_block_forward)")
            rep.replaced[f"{name}.norm1"] = "ada_layer_norm (scale_shift_table shift/scale)"
            rep.replaced[f"{name}.norm3"] = "gated_residual_ada_layer_norm (cross-attn residual + modulated norm)"
            if isinstance(block.norm2, FP32LayerNorm):
                rep.replaced[f"{name}.norm2"] = "gated_residual_ada_layer_norm (gate + affine LayerNorm)"
        else:
            rep.left_alone[name] = "norms=False: diffusers' block forward"
    for attn_name in ("attn1", "attn2"):
        for i, block in enumerate(model.blocks):
            attn = getattr(block, attn_name)
            C = attn.inner_dim
            _check_rms(f"blocks.{i}.{attn_name}.norm_q", attn.norm_q, C)
            _check_rms(f"blocks.{i}.{attn_name}.norm_k", attn.norm_k, C)
            if attn.add_k_proj is not None:
                _check_rms(f"blocks.{i}.{attn_name}.norm_added_k", attn.norm_added_k, C)
    if attention or rope:
        procs = dict(model.attn_processors)
        for key in procs:
            procs[key] = MugvWanAttnProcessor(rope=rope, attention=attention, backend=backend)
            mod_name = key[: -len(".processor")]
            parts = []
            if rope:
                parts.append(
                    "QK RMSNorm across heads + 3D RoPE (qk_norm_across_heads_rope3d)"
                    if mod_name.endswith("attn1") else "QK RMSNorm across heads (qk_norm_rope3d, no rotation)"
                )  # fmt: skip
            if attention:
                parts.append("varlen_attention" + ("" if mod_name.endswith("attn1") else ", padded caption skipped"))
            rep.replaced[mod_name] = "MugvWanAttnProcessor: " + "; ".join(parts)
            for sub in ("norm_q", "norm_k", "norm_added_k"):
                if rope and hasattr(getattr(model.get_submodule(mod_name), sub, None), "weight"):
                    rep.replaced[f"{mod_name}.{sub}"] = "fused into the processor's QK norm op"
        patch.processors = procs
    else:
        for key in model.attn_processors:
            rep.left_alone[key[: -len(".processor")]] = "attention=False and rope=False: diffusers' processor"


def _plan_hunyuan(model, patch: _Patch, attention: bool, norms: bool, rope: bool, backend: str) -> None:
    rep = patch.report
    cfg = model.config
    sections = tuple(cfg.rope_axes_dim)
    theta = float(cfg.rope_theta)
    if rope:
        if type(model.rope) is not _hv.HunyuanVideoRotaryPosEmbed or tuple(model.rope.rope_dim) != sections:
            raise ValueError("rope: expected HunyuanVideoRotaryPosEmbed with rope_dim = config.rope_axes_dim")
        _hook(patch, "rope", model.rope, _rope_positions_forward, "int positions [N, 3] (t, h, w) for the fused RoPE")
    else:
        rep.left_alone["rope"] = "rope=False: diffusers' cos/sin tables"
    dual_types = (_hv.HunyuanVideoTransformerBlock, _hv.HunyuanVideoTokenReplaceTransformerBlock)
    single_types = (_hv.HunyuanVideoSingleTransformerBlock, _hv.HunyuanVideoTokenReplaceSingleTransformerBlock)
    blocks = [(f"transformer_blocks.{i}", b, dual_types) for i, b in enumerate(model.transformer_blocks)]
    singles = enumerate(model.single_transformer_blocks)
    blocks += [(f"single_transformer_blocks.{i}", b, single_types) for i, b in singles]
    patched_attn = set()
    for name, block, types in blocks:
        if type(block) not in types:
            raise ValueError(f"{name}: expected one of {[t.__name__ for t in types]}, got {type(block).__name__}")
        attn = block.attn
        D = attn.inner_dim // attn.heads
        for sub in ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if attn.add_q_proj is not None else ()):
            _check_rms(f"{name}.attn.{sub}", getattr(attn, sub), D)
        if sum(sections) > D:
            raise ValueError(f"{name}: rope_axes_dim {sections} sums past head_dim {D}")
        patched_attn.add(f"{name}.attn")
        if norms:
            dual = types is dual_types
            fn = _hv_dual_block_forward if dual else _hv_single_block_forward
            _hook(patch, name, block, fn, f"fused adaLN {'dual' if dual else 'single'}-stream block forward")
            for sub in ("norm1", "norm1_context", "norm2", "norm2_context") if dual else ("norm",):
                mod = getattr(block, sub)
                norm = getattr(mod, "norm", mod)
                if getattr(norm, "weight", None) is not None:
                    raise ValueError(f"{name}.{sub}: expected a LayerNorm without affine, got {norm}")
                rep.replaced[f"{name}.{sub}"] = "ada_layer_norm / gated_residual_ada_layer_norm (index form for I2V)"
                if norm is not mod:
                    rep.replaced[f"{name}.{sub}.norm"] = "fused into the modulation op"
        else:
            rep.left_alone[name] = "norms=False: diffusers' block forward"
    if attention or rope:
        procs = dict(model.attn_processors)
        for key in procs:
            mod_name = key[: -len(".processor")]
            if mod_name in patched_attn:
                procs[key] = MugvHunyuanVideoAttnProcessor(
                    sections, theta, rope=rope, attention=attention, backend=backend
                )
                parts = (["QK RMSNorm + 3D RoPE (qk_norm_rope3d)"] if rope else []) + (
                    ["joint varlen_attention, padded caption dropped"] if attention else []
                )
                rep.replaced[mod_name] = "MugvHunyuanVideoAttnProcessor: " + "; ".join(parts)
                if rope:
                    for sub in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                        if getattr(model.get_submodule(mod_name), sub, None) is not None:
                            rep.replaced[f"{mod_name}.{sub}"] = "fused into qk_norm_rope3d"
            else:
                rep.left_alone[mod_name] = (
                    "token refiner attention (text only, its own square mask): diffusers' processor"
                )
        patch.processors = procs
    else:
        for key in model.attn_processors:
            rep.left_alone[key[: -len(".processor")]] = "attention=False and rope=False: diffusers' processor"


_CONV_BACKENDS = ("auto", "triton", "cuda", "reference")


def _plan_wan_vae(model, patch: _Patch, attention: bool, norms: bool, rope: bool, backend: str) -> None:
    rep = patch.report
    if backend not in _CONV_BACKENDS:
        raise ValueError(f"backend for AutoencoderKLWan must be one of {_CONV_BACKENDS}, got {backend!r}")
    for name, mod in model.named_modules():
        if not isinstance(mod, WanCausalConv3d):
            continue
        if type(mod) is not WanCausalConv3d:
            rep.left_alone[name] = f"{type(mod).__name__}: a subclass of WanCausalConv3d"
            continue
        kT, kH, kW = mod.kernel_size
        pw, _, ph, _, pt, _ = mod._padding
        why = None
        if kH % 2 == 0 or kW % 2 == 0 or (ph, pw) != (kH // 2, kW // 2):
            why = f"spatial padding {(ph, pw)} is not 'same' for kernel {(kH, kW)}"
        elif pt not in (0, kT - 1):
            why = f"time padding {pt} is neither causal ({kT - 1}) nor none"
        elif tuple(mod.dilation) != (1, 1, 1) or mod.groups != 1 or mod.padding_mode != "zeros":
            why = "dilation, groups or padding_mode other than diffusers' defaults"
        if why is not None:
            rep.left_alone[name] = why
            continue
        mode = "causal, cache as context" if pt else ("no time padding (x[:P] as context)" if kT > 1 else "1x1x1")
        _hook(patch, name, mod, _causal_conv_forward, f"causal_conv3d ({mode})", backend=backend)


_PLANNERS: dict[type, Callable] = {
    WanTransformer3DModel: _plan_wan,
    HunyuanVideoTransformer3DModel: _plan_hunyuan,
    AutoencoderKLWan: _plan_wan_vae,
}


def _fill_left_alone(model: nn.Module, rep: Report) -> None:
    """Every named module not yet in the report: left alone, with the nearest patched
    ancestor that calls it (if any)."""
    for name, mod in model.named_modules():
        if name in rep.replaced or name in rep.left_alone:
            continue
        kind = type(mod).__name__
        parts = name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        owner = next((a for a in ancestors if a in rep.replaced), None)
        if owner is not None:
            rep.left_alone[name] = f"{kind}: called as it is by the patched {owner} (peft LoRA layers keep working)"
        else:
            rep.left_alone[name] = f"{kind}: no mugv op for it; runs as in diffusers"


def apply_mugv_kernels(
    model: nn.Module, *, attention: bool = True, norms: bool = True, rope: bool = True, backend: str = "auto"
) -> Report:
    """Switch a diffusers video model to the ``mugv`` ops, in place.

    Supported: ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
    ``AutoencoderKLWan`` (exact classes) with diffusers :data:`SUPPORTED_DIFFUSERS`.
    Outputs match the stock model up to floating-point rounding, except where the caller
    asks for caption padding to be skipped. Wan: after patching (``norms=True``) the
    model's forward also takes ``encoder_attention_mask [B, L]`` (1 for real caption
    tokens, which come first; Wan's pipeline pads captions at the end), and the
    cross-attention then ignores the padded tokens, which the stock model attends to.
    HunyuanVideo drops its padded caption tokens from the joint attention (the stock model
    masks them as keys; its video output is the same).

    Args:
        model: an instantiated model (any device and dtype; meta too).
        attention: attention through :func:`mugv_kernels.varlen_attention` (transformers).
        norms: the adaLN modulation, gates and residuals on the fused ops
            (``ada_layer_norm``, ``gated_residual_ada_layer_norm``, ``gated_residual``),
            the block forwards replaced (transformers).
        rope: QK RMSNorm + 3D RoPE as one op (transformers).
        backend: transformers: the varlen attention backend (``"auto"`` or a name of
            :data:`mugv_kernels.ops.varlen_attention.BACKENDS`); ``AutoencoderKLWan``: the conv
            backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"reference"``). The flags do
            not apply to the VAE (its causal convs are always switched).

    Returns:
        A :class:`Report`: every module replaced and every module left alone, with why.

    Raises:
        RuntimeError: an untested diffusers version.
        TypeError: ``model`` is not one of the supported classes (subclasses included:
            they may change the forward), or a flag is not a bool.
        ValueError: the model is already patched; a module already carries a diffusers
            hook or an instance ``forward``; a submodule differs from what the supported
            release builds (the message names it); an unknown backend. Nothing is changed
            when anything raises.
    """
    version = _diffusers_version()
    planner = _PLANNERS.get(type(model))
    if planner is None:
        names = ", ".join(c.__name__ for c in _PLANNERS)
        raise TypeError(f"apply_mugv_kernels supports {names} (exact classes); got {type(model).__qualname__}")
    for flag_name, flag in (("attention", attention), ("norms", norms), ("rope", rope)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {flag!r}")
    if type(model) is not AutoencoderKLWan:
        backends = tuple(mk.varlen_attention_backends())
        if backend != "auto" and backend not in backends:
            raise ValueError(f"backend must be 'auto' or one of {backends}, got {backend!r}")
    if getattr(model, "_mugv_kernels", None) is not None:
        raise ValueError("the model is already patched: call remove_mugv_kernels(model) first")
    options = dict(attention=attention, norms=norms, rope=rope, backend=backend)
    patch = _Patch(Report(type(model).__name__, version, options))
    planner(model, patch, attention, norms, rope, backend)
    _fill_left_alone(model, patch.report)
    # everything checked: now change the model
    if patch.processors is not None:
        patch.original_processors = dict(model.attn_processors)
        model.set_attn_processor(dict(patch.processors))
    for module, hook in patch.hooks:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    model._mugv_kernels = patch
    return patch.report


def remove_mugv_kernels(model: nn.Module) -> None:
    """Undo :func:`apply_mugv_kernels`: the stock processors and forwards come back (hooks
    registered later by others stay, in their order). Parameters are never touched.

    Raises:
        ValueError: the model is not patched.
    """
    patch = getattr(model, "_mugv_kernels", None)
    if patch is None:
        raise ValueError("the model is not patched by apply_mugv_kernels")
    for module, _ in patch.hooks:
        registry = module._diffusers_hook
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:  # nothing else hooked: leave the module as diffusers built it
            fwd = vars(module).get("forward")
            if getattr(fwd, "__func__", None) is type(module).forward:
                del module.forward
            del module._diffusers_hook
    if patch.original_processors is not None:
        model.set_attn_processor(dict(patch.original_processors))
    del model._mugv_kernels
