"""The released MUG-V video VAE (``"mugv-released"``): the truncated SDXL spatial stage, the
temporal stage, the file's latent scale and shift.

This is the public ``MUGAutoencoderPipeline`` (``mug_v/encoder/vae/vae.py`` of
``Shopee-MUG/MUG-V``):

* encode ``[B, 3, T, H, W]`` pixels in [-1, 1]: every frame through the truncated SDXL encoder
  (:class:`mugv.models.vae_spatial.SpatialVAE`, micro-batches of 4 frames, features times
  0.18215) -> ``[B, 512, T, H/8, W/8]``; an ``8k+1``-frame clip gets its first frame repeated 7
  times in front; the temporal VAE (the ``"mugv-compat"`` :class:`mugv.models.VideoVAE`) encodes
  independent ``micro_frame_size = 48``-frame chunks; the latent is ``(z - shift) / scale``;
* decode: ``z * scale + shift``, the temporal decoder per chunk of 6 latents
  (``min(48, frames left)`` frames each), then every frame through the truncated SDXL decoder.

Sizes: ``L = get_latent_size(T)`` latents (``8k+1`` frames: ``k+1``; 105 frames: 14), 24
channels, 8x8 in space. The released state dict (``vae.pt``) loads with ``strict=True``:
``spatial_vae.module.*`` (the SDXL encoder/decoder, its unused layers dropped; see
:mod:`mugv.models.vae_spatial`), ``temporal_vae.*``, ``scale`` and ``shift`` (``[1, 24, 1, 1, 1]``
buffers, saved) and ``logvar`` (a scalar training parameter, kept for the layout).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mugv.models.vae import MUGV_LATENT_MEAN, MUGV_LATENT_STD, DiagonalGaussian, VAEConfig, VideoVAE
from mugv.models.vae_spatial import SpatialVAE

__all__ = ["RELEASED_PRESET", "ReleasedVideoVAE"]

RELEASED_PRESET = "mugv-released"


def _stats(t: Tensor) -> tuple[float, ...] | None:
    """Per-channel statistics from a saved ``[1, C, 1, 1, 1]`` buffer (None for meta tensors)."""
    return None if t.is_meta else tuple(t.float().reshape(-1).tolist())


class ReleasedVideoVAE(nn.Module):
    """The released MUG-V VAE (see the module docstring); ``VideoVAE.from_preset("mugv-released")``
    builds one with random weights, :meth:`from_released` loads ``vae.pt``.

    Args:
        config: a ``"mugv-released"`` :class:`mugv.models.VAEConfig` (default
            ``VAEConfig.from_preset("mugv-released")``: the released structure), or a
            ``"mugv-compat"`` config of the temporal stage alone (its ``in_out_channels`` must
            equal the spatial stage's last width), the spatial stage then from the keywords.
        block_out_channels, layers_per_block, norm_num_groups, frame_batch: override the config's
            ``spatial_block_out_channels``, ``spatial_layers_per_block``, ``spatial_num_groups``
            (SDXL: ``(128, 256, 512, 512)``, 2, 32) and ``frame_batch`` (frames per spatial
            micro-batch, public 4); ``None`` keeps the config's.
        kernels: GroupNorm(+SiLU) and the temporal convolutions through ``mugv_kernels``.
        tile_size, tile_overlap: spatial tiling of large frames, in pixels (off by default; see
            :meth:`mugv.models.vae_spatial.SpatialVAE.set_tiling`: it departs from the public
            output).

    Attributes:
        config: the ``"mugv-released"`` config (latent mean/std = the file's ``shift``/``scale``).

    Raises:
        ValueError: a config of another arch, a temporal config whose channels do not match,
            or bad tiling sizes.
    """

    preset = RELEASED_PRESET

    def __init__(self, config: VAEConfig | None = None, *, block_out_channels: tuple[int, ...] | None = None,
                 layers_per_block: int | None = None, norm_num_groups: int | None = None,
                 frame_batch: int | None = None, kernels: bool | str = True, tile_size: int | None = None,
                 tile_overlap: int | None = None) -> None:
        super().__init__()
        config = config if config is not None else VAEConfig.from_preset(RELEASED_PRESET)
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        over = {k: v for k, v in dict(spatial_block_out_channels=block_out_channels,
                                      spatial_layers_per_block=layers_per_block,
                                      spatial_num_groups=norm_num_groups, frame_batch=frame_batch).items()
                if v is not None}
        if config.arch == "mugv-compat":  # the temporal stage alone
            last = tuple(over.get("spatial_block_out_channels", config.spatial_block_out_channels))[-1]
            if config.in_out_channels != last:
                raise ValueError(f"temporal in_out_channels={config.in_out_channels} must equal the spatial stage's "
                                 f"last width {last}")
            over.update(arch=RELEASED_PRESET, in_out_channels=3)
        elif config.arch != RELEASED_PRESET:
            raise ValueError(f"config must be a 'mugv-released' (or a 'mugv-compat' temporal stage) config, got "
                             f"arch={config.arch!r}")
        config = replace(config, **over) if over else config
        c = config.latent_channels
        mean = config.latent_mean or (MUGV_LATENT_MEAN if c == len(MUGV_LATENT_MEAN) else (0.0,) * c)
        std = config.latent_std or (MUGV_LATENT_STD if c == len(MUGV_LATENT_STD) else (1.0,) * c)
        self.config = replace(config, latent_mean=tuple(mean), latent_std=tuple(std))
        # the temporal stage works on raw latents here; the pipeline's scale/shift normalize
        temporal = replace(config.temporal_stage(), latent_mean=None, latent_std=None)
        self.spatial_vae = SpatialVAE(config.in_out_channels, config.spatial_block_out_channels,
                                      config.spatial_layers_per_block, config.spatial_num_groups,
                                      frame_batch=config.frame_batch)
        self.temporal_vae = VideoVAE(temporal)
        self.register_buffer("scale", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.logvar = nn.Parameter(torch.ones(()) * 4.0)
        self.set_kernels(kernels)
        self.set_tiling(tile_size, tile_overlap)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_released(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, frame_batch: int | None = 4,
                      kernels: bool = True, micro_frame_size: int | None = 48, tile_size: int | None = None,
                      tile_overlap: int | None = None) -> ReleasedVideoVAE:
        """Build the released VAE from its ``vae.pt`` (or a directory holding it), infer its
        widths from the shapes, load strictly, cast to ``dtype`` on ``device``.
        ``micro_frame_size``: the temporal chunk (public 48; a multiple of 8, or None).
        ``frame_batch``: frames per spatial micro-batch (public 4; None: all).
        ``tile_size``/``tile_overlap``: spatial tiling (off by default; see :meth:`set_tiling`).

        Raises:
            FileNotFoundError: no such file (the message names the expected layout).
            ValueError: a file that is not a released MUG-V VAE state dict (lists what it found),
                or mismatched keys/shapes (all listed).
        """
        from mugv.models.checkpoint import CheckpointMismatchError, read_state_dict

        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "vae.pt")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"released VAE not found: {p} (expected the MUG-V-inference vae.pt, the state "
                                    "dict of MUGAutoencoderPipeline with spatial_vae.module.*, temporal_vae.*, "
                                    "scale, shift, logvar)")
        sd = read_state_dict(p)
        model = cls._from_state_dict_shapes(sd, p, frame_batch=frame_batch, kernels=kernels,
                                            micro_frame_size=micro_frame_size, tile_size=tile_size,
                                            tile_overlap=tile_overlap)
        own = model.state_dict()
        from mugv.models.vae_spatial import RELEASED_UNUSED_SPATIAL_KEYS

        unused = {"spatial_vae.module." + k for k in RELEASED_UNUSED_SPATIAL_KEYS}
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own) - unused)
        mismatched = [(k, sd[k].shape, own[k].shape) for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError(p, missing, unexpected, mismatched)
        model.load_state_dict(sd, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def _from_state_dict_shapes(cls, sd: dict[str, Tensor], path: str, *, micro_frame_size: int | None = 48,
                                frame_batch: int | None = 4, **kw: Any) -> ReleasedVideoVAE:
        """Infer the spatial widths/depth and the temporal widths from the released key shapes.
        GroupNorm group counts are not stored in a state dict: 32 (the released value), or the
        narrowest width when that is below 32 (small test models)."""
        need = ("spatial_vae.module.encoder.conv_in.weight", "temporal_vae.encoder.conv_in.conv.weight", "scale",
                "shift")
        if not all(k in sd for k in need):
            prefixes = sorted({k.split(".")[0] for k in sd})
            raise ValueError(f"{path} is not a released MUG-V VAE state dict: expected keys {list(need)} "
                             f"(spatial_vae.module.*, temporal_vae.*, scale, shift, logvar); found {len(sd)} keys "
                             f"with top-level names {prefixes[:12]}")
        enc = "spatial_vae.module.encoder.down_blocks."
        n_levels = 1 + max(int(k[len(enc):].split(".")[0]) for k in sd if k.startswith(enc))
        ch = tuple(sd[f"{enc}{i}.resnets.0.conv1.weight"].shape[0] for i in range(n_levels))
        layers = 1 + max(int(k[len(enc) + 2:].split(".")[1]) for k in sd if k.startswith(enc + "0.resnets."))
        groups = min(32, ch[0])
        tv = "temporal_vae.encoder."
        filters = sd[tv + "conv_in.conv.weight"].shape[0]
        levels = 1 + max(int(k[len(tv) + len("block_res_blocks."):].split(".")[0]) for k in sd
                         if k.startswith(tv + "block_res_blocks."))
        nres = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(tv + "block_res_blocks.0."))
        mults = tuple(sd[f"{tv}block_res_blocks.{i}.0.conv1.conv.weight"].shape[0] // filters for i in range(levels))
        tgroups = min(32, filters)
        config = VAEConfig.from_preset(RELEASED_PRESET, filters=filters, num_res_blocks=nres,
                                       channel_multipliers=mults, num_groups=tgroups, micro_frame_size=micro_frame_size,
                                       latent_mean=_stats(sd["shift"]), latent_std=_stats(sd["scale"]),
                                       spatial_block_out_channels=ch, spatial_layers_per_block=layers,
                                       spatial_num_groups=groups, frame_batch=frame_batch)
        return cls(config, **kw)

    def set_kernels(self, kernels: bool | str) -> ReleasedVideoVAE:
        """Both stages through ``mugv_kernels`` (True) or plain PyTorch (False)."""
        self.kernels = kernels
        self.spatial_vae.set_kernels(kernels)
        self.temporal_vae.set_kernels(kernels)
        return self

    def set_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> ReleasedVideoVAE:
        """Tile the spatial stage's frames (``tile_size`` pixels, ``None``: off, the default and
        the public output); see :meth:`mugv.models.vae_spatial.SpatialVAE.set_tiling`.

        Raises:
            ValueError: sizes that are not multiples of the compression, or an overlap above half a tile.
        """
        self.spatial_vae.set_tiling(tile_size, overlap)
        return self

    @property
    def tile_size(self) -> int | None:
        """The spatial tile in pixels (``None``: whole frames)."""
        return self.spatial_vae.tile_size

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.logvar.dtype

    @property
    def device(self) -> torch.device:
        return self.logvar.device

    @property
    def out_channels(self) -> int:
        return self.config.latent_channels

    @property
    def micro_frame_size(self) -> int | None:
        return self.config.micro_frame_size

    @property
    def spatial_compression(self) -> int:
        return self.spatial_vae.compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` frames (public ``get_latent_size``: 105 -> 14, 8 -> 1)."""
        return self.temporal_vae.num_latent_frames(num_frames)

    def get_latent_size(self, input_size: tuple[int | None, int | None, int | None]) -> list[int | None]:
        T, H, W = input_size
        f = self.spatial_compression
        return [None if T is None else self.num_latent_frames(T), None if H is None else H // f,
                None if W is None else W // f]

    def normalize(self, z: Tensor) -> Tensor:
        """``(z - shift) / scale``, in ``z``'s dtype."""
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """``z * scale + shift``, in ``z``'s dtype."""
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: Tensor, *, normalize: bool = True) -> DiagonalGaussian:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] (H, W multiples of 8) -> the posterior over
        ``[B, 24, L, H/8, W/8]`` latents (normalized with the file's scale/shift unless
        ``normalize=False``). Sample it per ``micro_frame_size`` chunk in order to reproduce the
        public draws (see :func:`mugv.pipeline.sample_posterior`).

        Raises:
            TypeError / ValueError: not a float 5-D RGB tensor, or H/W not multiples of 8.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        feats = self.spatial_vae.encode(x.to(self.dtype))
        post = self.temporal_vae.encode(feats, normalize=False)
        if not normalize:
            return post
        return post.affine(self.shift.to(post.mean.dtype), self.scale.to(post.mean.dtype))

    def decode(self, z: Tensor, num_frames: int | None = None, *, normalized: bool = True, callback=None) -> Tensor:
        """Latents ``[B, 24, L, h, w]`` -> pixels ``[B, 3, T, 8h, 8w]`` in the model dtype
        (``num_frames``: the encoded clip's length, default ``8 L``; public decode rule).
        ``callback()`` (optional) is called after the temporal stage and after each spatial
        micro-batch: ``1 + spatial_vae.micro_batches(B * T)`` calls (progress bars).

        Raises:
            TypeError / ValueError: bad ``z`` or a ``num_frames`` that does not fit ``L``.
        """
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {type(z).__name__}")
        z = z.to(self.dtype)
        if normalized:
            z = self.denormalize(z)
        feats = self.temporal_vae.decode(z, num_frames, normalized=False)
        if callback is not None:
            callback()
        return self.spatial_vae.decode(feats, callback=callback)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, latent={self.out_channels}, compression=(8, {self.spatial_compression})"
