"""The Wan2.1 video VAE of the enhancer: diffusers' ``AutoencoderKLWan`` with its causal 3D
convs on :func:`mugv_kernels.causal_conv3d` (``apply_mugv_kernels`` of
:mod:`mugv_kernels.integrations.diffusers`), loaded from the original ``Wan2.1_VAE.pth`` (the
``WanVAE_`` state dict of the Wan2.1 release, converted on load) or a diffusers ``vae/``
directory.

Latents: 16 channels, 4x in time (causal: ``T = 4k + 1`` frames -> ``k + 1`` latent frames),
8x in space; normalized per channel as ``z = (mu - mean) / std`` with Wan2.1's
``latents_mean``/``latents_std`` (the public pipeline encodes to the posterior mean). The
decoder runs one latent frame at a time with the causal cache (diffusers' ``_decode``: streamed
in time); with ``tiling`` each frame is decoded in overlapping spatial tiles (diffusers'
``enable_tiling``), so 105 frames at 720x1280 decode in a bounded working set.

Key conversion (original ``WanVAE_`` -> diffusers), module by module: ``conv1``/``conv2`` ->
``quant_conv``/``post_quant_conv``; ``{en,de}coder.conv1`` -> ``conv_in``; ``head.0``/``head.2``
-> ``norm_out``/``conv_out``; ``middle.0/1/2`` -> ``mid_block.resnets.0`` /
``mid_block.attentions.0`` / ``mid_block.resnets.1``; ``encoder.downsamples.i`` ->
``encoder.down_blocks.i``; ``decoder.upsamples.i`` (flat: per stage ``num_res_blocks + 1``
residual blocks, then a resample) -> ``decoder.up_blocks.s.resnets.j`` /
``up_blocks.s.upsamplers.0``; inside a residual block ``residual.0/2/3/6`` -> ``norm1`` /
``conv1`` / ``norm2`` / ``conv2`` and ``shortcut`` -> ``conv_shortcut``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["WAN21_VAE_CONFIG", "WanVAE", "convert_wan_vae_state_dict", "load_wan_vae"]

WAN21_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                        temperal_downsample=(False, True, True))
"""``AutoencoderKLWan`` arguments of the Wan2.1 VAE (the original ``WanVAE_`` defaults)."""

_RES = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
        "shortcut.": "conv_shortcut."}


def _block(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def convert_wan_vae_state_dict(sd: Mapping[str, Tensor], *, num_res_blocks: int = 2,
                               where: str = "state dict") -> dict[str, Tensor]:
    """Original ``WanVAE_`` keys -> ``AutoencoderKLWan`` keys (module docstring).

    Raises:
        ValueError: a key outside the original layout (names it).
    """
    out: dict[str, Tensor] = {}
    per_stage = num_res_blocks + 2  # residual blocks + 1, then a resample
    for key, v in sd.items():
        k = key
        if k.startswith("conv1."):
            k = "quant_conv." + k[6:]
        elif k.startswith("conv2."):
            k = "post_quant_conv." + k[6:]
        else:
            m = re.match(r"^(encoder|decoder)\.(.+)$", k)
            if not m:
                raise ValueError(f"{where}: key {key!r} is not in the Wan VAE layout")
            side, rest = m.groups()
            if rest.startswith("conv1."):
                rest = "conv_in." + rest[6:]
            elif rest.startswith("head.0."):
                rest = "norm_out." + rest[7:]
            elif rest.startswith("head.2."):
                rest = "conv_out." + rest[7:]
            elif mm := re.match(r"^middle\.(\d)\.(.+)$", rest):
                i, r = int(mm[1]), mm[2]
                rest = ("mid_block.attentions.0." + r) if i == 1 else f"mid_block.resnets.{i // 2}." + _block(r)
            elif side == "encoder" and (mm := re.match(r"^downsamples\.(\d+)\.(.+)$", rest)):
                rest = f"down_blocks.{mm[1]}." + _block(mm[2])
            elif side == "decoder" and (mm := re.match(r"^upsamples\.(\d+)\.(.+)$", rest)):
                i = int(mm[1])
                s, j = divmod(i, per_stage)
                if j <= num_res_blocks:
                    rest = f"up_blocks.{s}.resnets.{j}." + _block(mm[2])
                else:
                    rest = f"up_blocks.{s}.upsamplers.0." + mm[2]
            else:
                raise ValueError(f"{where}: key {key!r} is not in the Wan VAE layout")
            k = f"{side}.{rest}"
        out[k] = v
    return out


class WanVAE:
    """The Wan2.1 VAE for the enhancer: normalized encode/decode around an ``AutoencoderKLWan``.

    Args:
        vae: the diffusers model (weights loaded; kernels applied or not).
        tiling: decode in spatial tiles (diffusers' ``enable_tiling``, its default 256-pixel
            tiles with 192-pixel stride, seams blended) when a frame is larger than a tile. The
            encode is never tiled (the public pipeline encodes whole frames), and neither is the
            public decode: ``tiling=False`` is the public output, True bounds the decoder's memory.
    """

    def __init__(self, vae, *, tiling: bool = True) -> None:
        self.vae = vae.eval()
        cfg = vae.config
        p = next(vae.parameters())
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=p.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=p.device).view(1, -1, 1, 1, 1)
        if tiling:
            vae.enable_tiling()
        else:
            vae.disable_tiling()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` in ``[-1, 1]`` (``T = 4k + 1``, H and W multiples of 8) -> normalized
        latent mean ``[B, 16, k + 1, H / 8, W / 8]`` fp32.

        Raises:
            ValueError: a shape that does not fit (names the rule).
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        if (T - 1) % 4 or H % 8 or W % 8:
            raise ValueError(f"video (T, H, W) = {(T, H, W)}: the Wan VAE needs T = 4k + 1 and H, W multiples of 8")
        tiled, self.vae.use_tiling = self.vae.use_tiling, False
        try:
            mu = self.vae.encode(video.to(self.dtype)).latent_dist.mode().float()
        finally:
            self.vae.use_tiling = tiled
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalized latent ``[B, 16, t, h, w]`` -> video ``[B, 3, 4 (t - 1) + 1, 8 h, 8 w]`` fp32
        in ``[-1, 1]``."""
        x = z.float() * self.std.to(z.device) + self.mean.to(z.device)
        return self.vae.decode(x.to(self.dtype)).sample.float()


def load_wan_vae(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kernels: bool | str = True, tiling: bool = True, config: Mapping | None = None) -> WanVAE:
    """The Wan2.1 VAE from ``Wan2.1_VAE.pth`` (original layout, converted) or a diffusers ``vae/``
    directory, strict, on the ``mugv`` causal conv when ``kernels``.

    Args:
        path: the ``.pth`` file, or a directory holding it (``Wan2.1_VAE.pth``) or a diffusers
            ``vae/`` subfolder (``config.json`` + weights).
        kernels: True (``"auto"``) or a conv backend name (``"triton"``, ``"cuda"``,
            ``"reference"``): the causal convs on :func:`mugv_kernels.causal_conv3d`; False: stock diffusers.
        tiling: see :class:`WanVAE`.
        config: ``AutoencoderKLWan`` arguments for the ``.pth`` (default :data:`WAN21_VAE_CONFIG`).

    Raises:
        FileNotFoundError: nothing loadable at ``path`` (names what it looked for).
        ValueError: a ``.pth`` outside the Wan VAE layout, or one that does not load strictly.
    """
    from diffusers import AutoencoderKLWan

    from mugv.models.checkpoint import read_state_dict

    p = Path(path)
    pth = None
    if p.is_file():
        pth = p
    elif (p / "Wan2.1_VAE.pth").is_file():
        pth = p / "Wan2.1_VAE.pth"
    elif (p / "vae" / "config.json").is_file() or (p / "config.json").is_file():
        d = p / "vae" if (p / "vae" / "config.json").is_file() else p
        vae = AutoencoderKLWan.from_pretrained(str(d), local_files_only=True, torch_dtype=dtype).to(device)
    else:
        raise FileNotFoundError(f"Wan VAE not found: {p} is neither Wan2.1_VAE.pth, a directory holding it, nor a "
                                "diffusers vae/ directory (config.json + weights)")
    if pth is not None:
        cfg = dict(WAN21_VAE_CONFIG if config is None else config)
        sd = convert_wan_vae_state_dict(read_state_dict(pth), num_res_blocks=cfg["num_res_blocks"], where=str(pth))
        with torch.device("meta"):
            vae = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
        try:
            vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{pth} does not load strictly into AutoencoderKLWan({cfg}): {e}") from e
    if kernels:
        from mugv_kernels.integrations.diffusers import apply_mugv_kernels

        apply_mugv_kernels(vae, backend="auto" if kernels is True else kernels)
    return WanVAE(vae, tiling=tiling)
