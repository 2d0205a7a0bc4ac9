"""The MUG-V video enhancer: one-step SDEdit with the Wan2.1-based I2V refiner.

Public ``mug_enhancer/pipelines/wan_video.py`` (``WanVideoPipeline.enhance_video``) and
``predict.py``: encode the input video with the Wan2.1 VAE (latent ``z0``, the posterior mean),
noise it to ``sigma`` (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations", Sec. 3), keep the first latent frame clean, run Euler steps
of the rectified-flow velocity (diffsynth's ``FlowMatchScheduler`` with ``sigma_max = sigma``,
``sigma_min = 0``, ``extra_one_step``: ``sigmas = linspace(sigma, 0, steps + 1)[:-1]``, shifted by
``shift * s / (1 + (shift - 1) s)``, timestep ``1000 * s``, ``x += v * (s_next - s)``) with
classifier-free guidance ``v = v_neg + cfg (v_pos - v_neg)``, and decode. The DiT sees ``z0`` a
second time through ``patch_embedding2`` and modulates the first latent frame with ``t0 = 0``.
Public settings: sigma 0.3, shift 1.0, CFG 2.0, 1 step, the negative prompt below.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENHANCE_NEGATIVE_PROMPT",
    "EnhancePipeline",
    "enhance_latents",
    "enhance_sigmas",
]

ENHANCE_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
"""The negative prompt of the public enhancer (``predict.py``; Wan2.1's default)."""


def enhance_sigmas(steps: int = 1, sigma: float = 0.3, shift: float = 1.0) -> Tensor:
    """Noise levels ``[steps]`` fp32 of the SDEdit schedule (module docstring).

    Raises:
        ValueError: ``steps < 1``, ``sigma`` outside ``(0, 1]``, ``shift <= 0``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0.0 < float(sigma) <= 1.0:
        raise ValueError(f"sigma must be in (0, 1], got {sigma!r}")
    if float(shift) <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    s = torch.linspace(float(sigma), 0.0, steps + 1)[:-1]
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def enhance_latents(dit: Any, latents: Tensor, noise: Tensor, context: Tensor, negative_context: Tensor | None, *,
                    sigma: float = 0.3, steps: int = 1, shift: float = 1.0, cfg: float = 2.0,
                    cond_frames: int = 1) -> Tensor:
    """The SDEdit refinement of a latent video (module docstring), CFG batched in one DiT call.

    Args:
        dit: a :class:`mugv.models.wan.WanDiT` (``video_condition``).
        latents: ``[B, C, T, H, W]`` the input video's normalized VAE latent ``z0``.
        noise: same shape, standard normal.
        context, negative_context: ``[B, L, text_dim]`` caption features (``L <= text_len``);
            the negative one is unused when ``cfg == 1``.
        sigma, steps, shift, cfg: the schedule and the guidance scale.
        cond_frames: leading latent frames kept clean and modulated with ``t0 = 0`` (public: 1).

    Returns:
        ``[B, C, T, H, W]`` fp32, the refined latent.

    Raises:
        ValueError: shapes that differ, a missing negative context with ``cfg != 1``, a bad
            schedule (:func:`enhance_sigmas`), ``cond_frames`` outside ``[0, T]``.
    """
    if noise.shape != latents.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of latents {tuple(latents.shape)}")
    T = latents.shape[2]
    if not 0 <= cond_frames <= T:
        raise ValueError(f"cond_frames must be in [0, {T}], got {cond_frames}")
    guided = float(cfg) != 1.0
    if guided and negative_context is None:
        raise ValueError("negative_context is required when cfg != 1")
    sig = enhance_sigmas(steps, sigma, shift)
    z0 = latents.float()
    x = (1 - sig[0]) * z0 + sig[0] * noise.float()
    first = z0[:, :, :cond_frames]
    x_mask = torch.arange(T, device=z0.device) < cond_frames if cond_frames else None
    B = z0.shape[0]
    if guided:
        L = max(context.shape[1], negative_context.shape[1])
        pad = lambda c: torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1]))  # noqa: E731 (zero rows, as the DiT pads)
        ctx = torch.cat([pad(context), pad(negative_context.to(context.dtype))])
        y = torch.cat([z0, z0])
    else:
        ctx, y = context, z0
    for i in range(steps):
        x[:, :, :cond_frames] = first
        t = (sig[i] * 1000).reshape(1).to(z0.device)
        xin = torch.cat([x, x]) if guided else x
        v = dit(xin, t, ctx, y=y, x_mask=x_mask)
        if guided:
            v_pos, v_neg = v[:B], v[B:]
            v = v_neg + cfg * (v_pos - v_neg)
        s_next = sig[i + 1] if i + 1 < steps else 0.0
        x = x + v * (s_next - sig[i])
    x[:, :, :cond_frames] = first
    return x
