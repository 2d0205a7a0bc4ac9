"""Text-to-video and image-to-video generation with MUG-V models: the released 10B or our own runs.

:class:`MUGVPipeline` runs the public ``infer_pipeline.py`` of ``Shopee-MUG/MUG-V`` (with
``mug_v/utils.py`` and ``mug_v/scheduler/rectified_flow.py``) step for step, so that the same
seed, weights and text states give the same latents and the same video:

1. the prompt gets the suffix `` aesthetic score: 6.0.`` (``aes_score``); the negative prompt
   (:data:`mugv.diffusion.MUGV_NEGATIVE_PROMPT`) is encoded with it in one batch;
2. the frame size comes from the 720p table, keyed **height:width** as the public code reads
   it (``"16:9"`` is 1280 high and 720 wide), the frame count from the duration (``"5s"``: 105,
   ``"3s"``: 73); the latent grid is ``[24, L, H // 8, W // 8]`` (105 frames: 14 latents);
3. image-to-video: the image is resized to cover the frame and center-cropped (bicubic), repeated
   as 8 frames and encoded; its posterior is sampled per ``micro_frame_size`` chunk with
   ``randn`` on the **CPU** generator (the public ``DiagonalGaussianDistribution.sample``);
4. the starting noise is one ``randn`` of the latent shape in the model dtype on the device;
5. :meth:`mugv.diffusion.RectifiedFlow.sample` with ``noise_draws="public"`` (one more draw that
   noises the generated frames, one unused draw per step) and
   :meth:`~mugv.diffusion.RectifiedFlow.public_timesteps` (the shift ratio from the bucket's
   height, width and latent frames, evaluated in the model dtype), 25 Euler steps, CFG 4.0 with
   cond and uncond in one batch, ``x_mask`` False on the reference latent (``t0`` modulation);
6. decoding: image-to-video decodes latents ``1:`` (``num_frames - 1`` frames) and prepends the
   image; text-to-video decodes every latent; frames become uint8 as the public ``save_video``
   (clamp to [-1, 1], ``(x + 1) / 2 * 255 + 0.5``, truncate), in the decoder's dtype.

Seeding: ``seed`` seeds a generator on the device for steps 4-5 and a CPU generator for step 3,
as ``set_random_seed`` seeds the global CUDA and CPU generators (on a CPU device both are the one
CPU generator, in the public order).

Frame sizes that are not multiples of 16: the ``"3:4"`` (832 x 1110) and ``"4:3"`` (1108 x 832)
buckets are used as the public code uses them: the image is read at the bucket size, the latent
grid is ``size // 8`` (1110 and 1108 give 138 latent columns/rows), the time shift uses the bucket
size, and the decoded frames are ``8 * (size // 8)`` pixels (1104). The public pipeline then fails
to prepend the 1110-wide image to the 1104-wide video; here the image frame is cropped to the
decoded size (its first 1104 columns/rows, the pixels the latent grid covers).

Frame rate: the model is conditioned on ``fps`` (public 30); :func:`save_video` writes whatever
rate it is given. The CLI writes at 20 fps by default, as the public ``save_video`` (105 frames
are 5.25 s, the "5s" clip).

Memory (``offload``): the text encoder is moved to the CPU after encoding in every mode
(``offload_text_encoder=False`` keeps it on the device, for many calls on a large GPU).
``"none"`` keeps the DiT and the VAE on the device. ``"model"`` keeps each model on the device
only while it runs: the text encoder and the VAE while the DiT samples, the DiT while the VAE
decodes. ``"blocks"`` does the same and keeps the DiT
blocks in pinned host memory, copying block ``i + 1`` to the device on a side CUDA stream while
block ``i`` runs (:class:`BlockStreamer`). On a CPU device offloading moves nothing.

VAE tiling (``vae_tiling``, off by default): the released VAE's spatial stage encodes and
decodes frames larger than a tile in overlapping tiles blended linearly
(:meth:`mugv.models.vae_spatial.SpatialVAE.set_tiling`), which lowers its working set.
GroupNorm statistics and the mid-block attention then cover one tile instead of the whole
frame, so the frames depart from the public pipeline's (slightly on smooth content); with it
off the output is the public one. ``True`` means :data:`VAE_TILE_SIZE` pixels, an int the tile
side in pixels.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from mugv.config import ConfigError
from mugv.diffusion import MUGV_NEGATIVE_PROMPT, RectifiedFlow

__all__ = [
    "VAE_TILE_SIZE",
    "ASPECT_RATIO_720P",
    "BlockStreamer",
    "DURATIONS",
    "MUGVPipeline",
    "OFFLOAD_MODES",
    "frame_size",
    "num_frames_for",
    "read_image",
    "resolve_checkpoint",
    "sample_posterior",
    "save_video",
    "to_uint8",
]

VAE_TILE_SIZE = 512
"""Tile side in pixels for ``vae_tiling=True`` (the SD/SDXL VAE's training crop; neighbours
share a quarter of it)."""


def _tile_size(vae_tiling: bool | int | None) -> int | None:
    """``vae_tiling`` -> a tile side in pixels or None (off).

    Raises:
        TypeError / ValueError: not a bool, an int >= 0 or None.
    """
    if vae_tiling is None or vae_tiling is False:
        return None
    if vae_tiling is True:
        return VAE_TILE_SIZE
    if not isinstance(vae_tiling, int):
        raise TypeError(f"vae_tiling must be a bool or a tile size in pixels, got {type(vae_tiling).__name__}")
    if vae_tiling < 0:
        raise ValueError(f"vae_tiling must be >= 0 pixels (0 = off), got {vae_tiling}")
    return vae_tiling or None


ASPECT_RATIO_720P: dict[str, tuple[int, int]] = {
    "9:16": (720, 1280),
    "3:4": (832, 1110),
    "1:1": (960, 960),
    "4:3": (1108, 832),
    "16:9": (1280, 720),
}
"""The public 720p buckets, ``"height:width" -> (height, width)`` pixels (``mug_v/utils.py``)."""

DURATIONS: dict[str, int] = {"5s": 105, "3s": 73}
"""Frames per duration label (``mug_v/utils.py``)."""

OFFLOAD_MODES = ("none", "model", "blocks")


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` for a ``mugv train`` run directory (its newest checkpoint) or a
    checkpoint directory ``<run>/checkpoints/step_N``.

    Raises:
        FileNotFoundError: no ``config.json`` / no checkpoint found.
    """
    from mugv.train.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "config.json").exists():
        step = latest_checkpoint(p)
        if step is None:
            raise FileNotFoundError(f"--checkpoint {p}: the run has no checkpoint yet")
        return p, step
    if (p / ".metadata").exists() and (p.parent.parent / "config.json").exists():
        return p.parent.parent, p
    raise FileNotFoundError(f"--checkpoint {p}: expected a run directory (with config.json) or <run>/checkpoints/step_N")


def frame_size(aspect_ratio: str) -> tuple[int, int]:
    """``(height, width)`` of a 720p bucket, e.g. ``"16:9" -> (1280, 720)``.

    Raises:
        ConfigError: (a ``ValueError``) an unknown key (the message lists the supported ones).
    """
    if aspect_ratio not in ASPECT_RATIO_720P:
        raise ConfigError(f"unsupported aspect ratio {aspect_ratio!r} (height:width); supported: "
                         f"{', '.join(ASPECT_RATIO_720P)}")
    return ASPECT_RATIO_720P[aspect_ratio]


def num_frames_for(duration: str) -> int:
    """Frames of a duration label: ``"5s" -> 105``, ``"3s" -> 73``.

    Raises:
        ConfigError: (a ``ValueError``) an unknown label (the message lists the supported ones).
    """
    if duration not in DURATIONS:
        raise ConfigError(f"unsupported duration {duration!r}; supported: {', '.join(DURATIONS)} "
                         f"({', '.join(f'{k} = {v} frames' for k, v in DURATIONS.items())}), or pass num_frames")
    return DURATIONS[duration]


def read_image(image: str | os.PathLike | Any, height: int, width: int) -> Tensor:
    """An image (path or PIL image) -> ``float32 [3, 1, height, width]`` in [-1, 1]: resized with
    bicubic filtering to cover the frame, then center-cropped (public ``read_image_from_path``).

    Raises:
        FileNotFoundError: no such file. ValueError: a file that does not open as an image.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise FileNotFoundError(f"reference image not found: {p}")
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises several types
            raise ConfigError(f"reference image {p} does not open as an image: {e}") from e
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")
    w, h = img.size
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        img = img.resize((sw, sh), Image.BICUBIC)
        i, j = 0, int(round((sw - width) / 2.0))
    else:
        sh, sw = round(h * rw), width
        img = img.resize((sw, sh), Image.BICUBIC)
        i, j = int(round((sh - height) / 2.0)), 0
    arr = np.asarray(img)[i:i + height, j:j + width]
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)[:, None]


def sample_posterior(post: Any, chunk: int | None, generator: torch.Generator | None) -> Tensor:
    """``mean + std * eps`` of a VAE posterior, ``eps`` drawn as the public
    ``DiagonalGaussianDistribution.sample``: float32 ``randn`` on the CPU (``generator``, a CPU
    generator), one draw per ``chunk`` latent frames in order, moved to the mean's device and
    dtype. ``post``: anything with ``mean``/``std`` ``[B, C, L, h, w]``."""
    mean, std = post.mean, post.std
    step = mean.shape[2] if not chunk else chunk
    parts = []
    for i in range(0, mean.shape[2], step):
        m, s = mean[:, :, i:i + step], std[:, :, i:i + step]
        eps = torch.randn(m.shape, generator=generator).to(device=m.device, dtype=m.dtype)
        parts.append(m + s * eps)
    return torch.cat(parts, dim=2)


def to_uint8(video: Tensor) -> Tensor:
    """``[3, T, H, W]`` in [-1, 1] -> ``uint8 [T, H, W, 3]`` on the CPU, computed in ``video``'s dtype
    exactly as the public ``save_video``: clamp, ``(x + 1) / 2``, ``* 255 + 0.5``, clamp, truncate."""
    if not isinstance(video, Tensor) or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {getattr(video, 'shape', type(video).__name__)}")
    v = video.clone().clamp_(-1, 1).sub_(-1).div_(2)
    return v.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 3, 0).to("cpu", torch.uint8)


def save_video(frames: Tensor | np.ndarray, path: str | os.PathLike, fps: float) -> Path:
    """Write ``uint8 [T, H, W, 3]`` frames as an H.264 mp4 (PyAV, crf 17 as the public
    ``save_video``) at ``fps`` frames per second; creates the parent directory.

    Raises:
        ValueError: not uint8 ``[T, H, W, 3]`` with ``T >= 1``, or ``fps <= 0``.
    """
    from mugv.data.video import write_mp4

    arr = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {arr.dtype} {arr.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return write_mp4(np.ascontiguousarray(arr), path, fps=fps, crf=17)


# ----------------------------------------------------------------------------------------
# offloading
# ----------------------------------------------------------------------------------------


class BlockStreamer:
    """Keep ``blocks`` (an ``nn.ModuleList`` run in order) in pinned host memory and stream them
    to ``device``: before block ``i`` runs it waits for its copy, then starts copying block
    ``i + 1`` on a side CUDA stream; after block ``i`` its device copy is released (the caching
    allocator reuses it once the compute stream is done with it). Peak device memory for the
    blocks is two blocks. On a non-CUDA device nothing is copied (the hooks only count).

    Args:
        blocks: the DiT blocks. device: where they run.

    Attributes:
        prefetches: how many block copies were started (tests read it).
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str) -> None:
        self.blocks = blocks
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetches = 0
        self._host: list[list[Tensor]] = []
        self._events: dict[int, Any] = {}
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        for blk in blocks:
            host = []
            for p in blk.parameters():
                t = p.data.to("cpu")
                if self.cuda:
                    t = t.pin_memory()
                p.data = t
                host.append(t)
            self._host.append(host)
        self._handles = []
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(blk.register_forward_hook(self._make_post(i)))

    def _fetch(self, i: int) -> None:
        if i >= len(self.blocks) or i in self._events:
            return
        self.prefetches += 1
        if not self.cuda:
            self._events[i] = None
            return
        with torch.cuda.stream(self.stream):
            for p, h in zip(self.blocks[i].parameters(), self._host[i]):
                p.data = h.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._events[i] = ev

    def _make_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._fetch(i)
            ev = self._events.get(i)
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
                for p in module.parameters():
                    p.data.record_stream(torch.cuda.current_stream(self.device))
            self._fetch(i + 1)
        return hook

    def _make_post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._events.pop(i, None)
            if self.cuda:
                for p, h in zip(module.parameters(), self._host[i]):
                    p.data = h
        return hook

    def remove(self) -> None:
        """Remove the hooks (the parameters stay on the host)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _move(module: Any, device: torch.device | str) -> None:
    if module is None:
        return
    target = getattr(module, "model", module)  # a mugv.text.TextEncoder holds its model in .model
    if isinstance(target, nn.Module):
        target.to(device)


# ----------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------


class MUGVPipeline:
    """Generate videos with a MUG-V DiT, a video VAE and a text encoder (see the module docstring).

    Args:
        dit: a :class:`mugv.models.MUGDiT` (or any ``model(x, timestep, y, mask=, x_mask=, fps=)``
            callable that has a ``blocks`` list for ``offload="blocks"``).
        vae: a VAE with ``encode(x, normalize=False) -> posterior``, ``normalize(z)``,
            ``decode(z, num_frames)``, ``num_latent_frames(T)`` (the released VAE, or
            :class:`mugv.models.VideoVAE`).
        text_encoder: ``encoder(list_of_str) -> TextEmbeddings`` (:mod:`mugv.text`).
        flow: the sampler (default ``RectifiedFlow.from_preset("mugv")``: public sign, 25 steps,
            CFG 4.0).
        device: where the models run (default: the DiT's device).
        offload: ``"none"``, ``"model"`` or ``"blocks"``.
        offload_text_encoder: move the text encoder to the CPU after each encoding, whatever
            ``offload`` says (default True; it is needed only for the first step).
        vae_tiling: spatial tiling of the VAE (see the module docstring): False (default, the
            public output), True (:data:`VAE_TILE_SIZE`-pixel tiles) or a tile side in pixels;
            ``pipe(..., vae_tiling=)`` overrides it per call. Needs a VAE with ``set_tiling``
            (the released one).

    Raises:
        ValueError: an unknown ``offload``; ``vae_tiling`` for a VAE that cannot tile, or a bad size.
    """

    def __init__(self, dit: Any, vae: Any, text_encoder: Any, flow: RectifiedFlow | None = None, *,
                 device: torch.device | str | None = None, offload: str = "none",
                 offload_text_encoder: bool = True, vae_tiling: bool | int = False) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.vae_tiling = vae_tiling
        self._check_tiling(vae, vae_tiling)
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.flow = flow if flow is not None else RectifiedFlow.from_preset("mugv")
        params = list(dit.parameters()) if isinstance(dit, nn.Module) else []
        self.device = torch.device(device) if device is not None else (params[0].device if params else
                                                                         torch.device("cpu"))
        self.dtype = params[0].dtype if params else torch.float32
        self.offload = offload
        self.offload_text_encoder = bool(offload_text_encoder)
        self.streamer: BlockStreamer | None = None
        self.profile: dict[str, Any] = {}
        self.last_latents: Tensor | None = None
        if offload == "blocks" and hasattr(dit, "blocks"):
            if isinstance(dit, nn.Module):
                for name, child in dit.named_children():
                    if name != "blocks":
                        child.to(self.device)
                for name, p in dit.named_parameters(recurse=False):
                    p.data = p.data.to(self.device)
            self.streamer = BlockStreamer(dit.blocks, self.device)
        elif offload == "model":
            _move(dit, "cpu" if self.device.type == "cuda" else self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_released(cls, directory: str | os.PathLike, text_encoder: str | os.PathLike | Any = None, *,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      offload: str = "none", kernels: bool | None = None,
                      progress: bool = False, offload_text_encoder: bool = True,
                      vae_tiling: bool | int = False) -> MUGVPipeline:
        """The released MUG-V 10B from its directory (``dit.pt`` and ``vae.pt``) and a T5-v1.1-XXL
        (a local directory path, or an already built encoder).

        Args:
            directory: holds ``dit.pt`` and ``vae.pt`` (the ``MUG-V-inference`` download).
            text_encoder: a T5 directory (``None``: ``$MUGV_T5_PATH``) or an encoder object.
            device: default CUDA when available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
            offload, offload_text_encoder, vae_tiling: see the class. kernels: the fused ops
                (default on CUDA).

        Raises:
            FileNotFoundError: a missing ``dit.pt``/``vae.pt``/T5 (names the file and the layout).
            ConfigError: (a ``ValueError``) files that are not the released state dicts (lists
                what they hold).
        """
        from mugv.models.released import load_released_dit
        from mugv.models.vae_released import ReleasedVideoVAE

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"--released {d}: not a directory (expected the MUG-V-inference directory "
                                    "holding dit.pt and vae.pt)")
        for name in ("dit.pt", "vae.pt"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: the released directory must hold dit.pt (the DiT "
                                        "state dict) and vae.pt (the MUGAutoencoderPipeline state dict)")
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
        dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        k = dev.type == "cuda" if kernels is None else kernels
        stage = "cpu" if offload != "none" else dev
        if text_encoder is None or isinstance(text_encoder, (str, os.PathLike)):
            from mugv.text import load_t5

            text_encoder = load_t5(text_encoder, device="cpu" if offload_text_encoder else stage)  # first: a missing T5 fails before the big loads
        bar = _bar(3, "loading", progress)
        bar.update(1)
        try:
            vae = ReleasedVideoVAE.from_released(d / "vae.pt", device=stage, dtype=dt, kernels=k)
            bar.update(1)
            dit = load_released_dit(d / "dit.pt", device="cpu" if offload != "none" else dev, dtype=dt, kernels=k)
            bar.update(1)
        except ValueError as e:  # a file that is not the released state dict: an input error
            raise ConfigError(str(e)) from e
        bar.close()
        return cls(dit, vae, text_encoder, RectifiedFlow.from_preset("mugv"), device=dev, offload=offload,
                   offload_text_encoder=offload_text_encoder, vae_tiling=vae_tiling)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, vae: str | os.PathLike | None = None, use_ema: bool = True,
                 device: torch.device | str | None = None, offload: str = "none") -> MUGVPipeline:
        """A pipeline from a ``mugv train`` run: its DiT (EMA weights by default), the VAE its data
        were encoded with, its text encoder, and a sampler with its time shift and our velocity sign.

        Raises:
            FileNotFoundError: no run / checkpoint / VAE.
        """
        from dataclasses import fields

        from mugv.config import pick_device
        from mugv.models import DiTConfig, MUGDiT, VideoVAE
        from mugv.text import load_text_encoder
        from mugv.train.checkpoint import load_ema_weights

        run_dir, step_dir = resolve_checkpoint(run_dir)
        run = json.loads((run_dir / "config.json").read_text())
        dev = pick_device(str(device) if device is not None else "auto")
        on_gpu = dev.type == "cuda"
        names = {f.name for f in fields(DiTConfig)}
        dcfg = DiTConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in run["dit"].items() if k in names})
        with torch.device("meta"):
            model = MUGDiT(dcfg, kernels=on_gpu)
        model.to_empty(device="cpu")
        load_ema_weights(step_dir, model, use_ema=use_ema)
        model = model.to(dev, torch.bfloat16 if on_gpu else torch.float32).eval()
        vae_dir = vae or run.get("vae")
        if not vae_dir:
            raise FileNotFoundError("the run does not record its VAE; pass vae=")
        vae_m = VideoVAE.from_pretrained(vae_dir, device=dev)
        enc = load_text_encoder(run.get("text_encoder") or "minilm", device=dev)
        flow = RectifiedFlow(use_timestep_shift=bool(run.get("train", {}).get("timestep_shift", True)),
                             spatial_compression=vae_m.config.spatial_compression)
        pipe = cls(model, vae_m, enc, flow, device=dev, offload=offload)
        pipe.run_fps = float(run.get("fps") or 8.0)
        return pipe

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _on_device(self, module: Any, name: str):
        """Run with ``module`` on the device; with offload, back to the CPU afterwards."""
        off = self.device.type == "cuda" and self._offloads(name)
        if off:
            _move(module, self.device)
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stage = self.profile.setdefault(name, {"seconds": 0.0})
            stage["seconds"] += time.perf_counter() - t0
            if self.device.type == "cuda":
                stage["peak_memory_bytes"] = max(stage.get("peak_memory_bytes", 0),
                                                 torch.cuda.max_memory_allocated(self.device))
            if off:
                _move(module, "cpu")

    def _offloads(self, stage: str) -> bool:
        """Whether ``stage``'s model leaves the device after it runs (on CUDA)."""
        if stage == "encode_text" and self.offload_text_encoder:
            return True
        return self.offload != "none"

    def _encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        emb = self.text_encoder(texts)
        y, mask = emb.to_padded()
        return y.to(self.device)[:, None], mask.to(self.device)

    @staticmethod
    def _check_tiling(vae: Any, vae_tiling: bool | int | None) -> int | None:
        tile = _tile_size(vae_tiling)
        if tile is not None and not hasattr(vae, "set_tiling"):
            raise ValueError(f"vae_tiling needs a VAE that tiles frames (the released one), got "
                             f"{type(vae).__name__}")
        return tile

    @contextmanager
    def _tiling(self, vae_tiling: bool | int | None):
        """The VAE with this call's tiling (``None``: the pipeline's), restored afterwards."""
        tile = self._check_tiling(self.vae, self.vae_tiling if vae_tiling is None else vae_tiling)
        if not hasattr(self.vae, "set_tiling"):
            yield
            return
        sp = getattr(self.vae, "spatial_vae", self.vae)
        before = (sp.tile_size, sp.tile_overlap)
        self.vae.set_tiling(tile)
        try:
            yield
        finally:
            self.vae.set_tiling(*before)

    def _vae_chunk(self) -> int | None:
        mf = getattr(self.vae, "micro_frame_size", None)
        if mf is None:
            mf = getattr(getattr(self.vae, "config", None), "micro_frame_size", None)
        return None if mf is None else mf // 8

    def _public_vae(self) -> bool:
        """The released VAE: the public I2V path (image as 8 frames, latents ``1:`` decoded). A
        causal VAE (``"compact"``) encodes the image alone as the first latent and decodes all."""
        return getattr(self.vae, "preset", None) == "mugv-released"

    def _vae_dtype(self) -> torch.dtype:
        return getattr(self.vae, "dtype", self.dtype)

    def _spatial(self) -> int:
        s = getattr(self.vae, "spatial_compression", None)
        return int(s if s is not None else self.vae.config.spatial_compression)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(self, prompt: str, image: str | os.PathLike | Any | None = None,
                 negative_prompt: str = MUGV_NEGATIVE_PROMPT, aspect_ratio: str = "16:9", duration: str = "5s",
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int = 25, cfg: float = 4.0, seed: int = 42, fps: float = 30, aes_score: float | None = 6.0,
                 generator: torch.Generator | None = None, output: str = "frames",
                 progress: bool = True, vae_tiling: bool | int | None = None) -> Tensor:
        """Generate one clip.

        Args:
            prompt: the caption (the suffix `` aesthetic score: {aes_score:.1f}.`` is appended
                unless ``aes_score`` is None).
            image: a reference image (path or PIL image) for image-to-video; None: text-to-video.
            negative_prompt: the unconditional caption for CFG.
            aspect_ratio: a 720p bucket, **height:width** (see :data:`ASPECT_RATIO_720P`).
            duration: ``"5s"`` (105 frames) or ``"3s"`` (73); ``num_frames`` overrides it.
            height, width: override the bucket (multiples of 16), e.g. for small runs.
            steps, cfg: Euler steps and the CFG scale.
            seed: seeds the device generator (noise) and the CPU generator (VAE posterior).
            fps: the frame rate the model is conditioned on (public 30).
            generator: a device generator to use instead of seeding one (the CPU draws then use
                it too when it is a CPU generator, else a CPU generator seeded with ``seed``).
            output: ``"frames"`` (``uint8 [T, H, W, 3]`` on the CPU) or ``"latents"``
                (``float32 [1, 24, L, H/8, W/8]``, before decoding; also kept in
                ``self.last_latents`` after either).
            progress: tqdm bars for the sampling steps and the decoding.
            vae_tiling: this call's VAE tiling (``None``: the pipeline's; see the class).

        Raises:
            ValueError: an unknown aspect ratio / duration / output, sizes that are not multiples
                of 16, an empty prompt, ``steps < 1``, ``num_frames < 2`` for image-to-video.
            FileNotFoundError / ValueError: an image that does not exist or does not open.
        """
        with self._tiling(vae_tiling):
            return self._generate(prompt, image, negative_prompt, aspect_ratio, duration, num_frames, height, width,
                                  steps, cfg, seed, fps, aes_score, generator, output, progress)

    def _generate(self, prompt, image, negative_prompt, aspect_ratio, duration, num_frames, height, width, steps,
                  cfg, seed, fps, aes_score, generator, output, progress) -> Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompt must be a non-empty string")
        if output not in ("frames", "latents"):
            raise ValueError(f"output must be 'frames' or 'latents', got {output!r}")
        if int(steps) < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        H, W = frame_size(aspect_ratio)
        if (height is None) != (width is None):
            raise ConfigError("pass both height and width, or neither")
        if height is not None:
            if height < 16 or width < 16 or height % 16 or width % 16:
                raise ConfigError(f"height and width must be positive multiples of 16, got {height}x{width}")
            H, W = int(height), int(width)
        T = num_frames_for(duration)
        if num_frames is not None:
            T = int(num_frames)
        if T < 1 or (image is not None and T < 2):
            raise ConfigError(f"num_frames must be >= 1 (>= 2 with an image), got {T}")
        text = prompt if aes_score is None else f"{prompt} aesthetic score: {aes_score:.1f}."
        self.profile = {}
        dev = self.device
        gen = generator if generator is not None else torch.Generator(dev).manual_seed(int(seed))
        cpu_gen = gen if gen.device.type == "cpu" else torch.Generator("cpu").manual_seed(int(seed))
        f = self._spatial()
        L = self.vae.num_latent_frames(T)
        h, w = H // f, W // f

        ref = ref_img = None
        public_i2v = self._public_vae()
        if image is not None:
            ref_img = read_image(image, H, W)  # [3, 1, H, W]
            with self._on_device(self.vae, "encode_image"):
                x = ref_img.repeat(1, 8 if public_i2v else 1, 1, 1)[None].to(dev, self._vae_dtype())
                post = self.vae.encode(x, normalize=False)
                ref = self.vae.normalize(sample_posterior(post, self._vae_chunk(), cpu_gen))  # [1, 24, 1, h, w]
        noise = torch.randn(1, self.flow_channels(), L, h, w, generator=gen, device=dev, dtype=self.dtype)
        with self._on_device(self.text_encoder, "encode_text"):
            y, mask = self._encode_text([text, negative_prompt])
        with self._on_device(self.dit if self.streamer is None else None, "sample"):
            ts = self.flow.public_timesteps(int(steps), height=H, width=W, num_frames=L, ratio_dtype=self.dtype,
                                            device=dev)
            z = self.flow.sample(self.dit, noise, y[:1], y[1:], mask=mask[:1], mask_null=mask[1:],
                                 fps=torch.tensor([fps], device=dev, dtype=self.dtype),
                                 cond_latents=None if ref is None else ref[:, :, :1].to(noise.dtype),
                                 guidance_scale=cfg, timesteps=ts, noise_draws="public", generator=gen,
                                 progress=progress)
        self.last_latents = z
        if output == "latents":
            return z
        with self._on_device(self.vae, "decode"):
            vd = self._vae_dtype()
            i2v = ref is not None and public_i2v
            sp = getattr(self.vae, "spatial_vae", None)
            if hasattr(sp, "micro_batches"):  # the released VAE: one tick per stage / micro-batch
                bar = _bar(1 + sp.micro_batches(T - 1 if i2v else T), "decoding", progress)
                kw = {"callback": lambda: bar.update(1)}
            else:
                bar, kw = _bar(1, "decoding", progress), {}
            if not i2v:
                video = self.vae.decode(z.to(vd), num_frames=T, **kw)[0]
            else:
                video = self.vae.decode(z[:, :, 1:].to(vd), num_frames=T - 1, **kw)[0]
                first = ref_img[:, :, :video.shape[2], :video.shape[3]].to(device=video.device, dtype=video.dtype)
                video = torch.cat([first, video], dim=1)
            if not kw:
                bar.update(1)
            bar.close()
            frames = to_uint8(video)
        return frames

    def flow_channels(self) -> int:
        """Latent channels the DiT takes (24 for MUG-V)."""
        cfg = getattr(self.dit, "cfg", None) or getattr(self.dit, "config", None)
        if cfg is not None and hasattr(cfg, "in_channels"):
            return int(cfg.in_channels)
        return int(getattr(self.vae, "out_channels", 24))

    def profile_json(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write the last call's per-stage seconds (and peak device memory on CUDA, per stage) as
        JSON, with the process's peak resident host memory (``host_max_rss_bytes``, Linux/macOS)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {"device": str(self.device), "dtype": str(self.dtype), "offload": self.offload,
                                "vae_tiling": self.vae_tiling, "stages": self.profile}
        try:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            info["host_max_rss_bytes"] = int(rss if sys.platform == "darwin" else rss * 1024)
        except ImportError:  # Windows
            pass
        p.write_text(json.dumps({**info, **extra}, indent=2))
        return p


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)


# The MUG-V enhancer (one-step SDEdit with the Wan2.1-based refiner) lives in mugv.enhance.
from mugv.enhance import EnhancePipeline  # noqa: E402

__all__ += ["EnhancePipeline"]
