"""``mugv generate --checkpoint RUN``: text-to-video or image-to-video sampling from a training run.

Builds :meth:`mugv.pipeline.MUGVPipeline.from_run` (the DiT of a run, EMA weights by default,
the run's VAE and text encoder), samples one clip through the same pipeline as the released
model (image-to-video: the reference image's latent is the clean first latent frame; the empty
caption as the unconditional text, no aesthetic suffix) and writes an mp4 (PyAV, H.264) plus a
PNG contact sheet of evenly spaced frames.

Parallel sampling (both entry points, under ``torchrun``): ``context_parallel=N`` shards the
packed sequence of every DiT call over ``N`` ranks (Ulysses), ``cfg_parallel=True`` runs the
conditional and unconditional halves of classifier-free guidance on two ranks; together they
take ``2 * N`` ranks. :func:`mugv.train.parallelize.parallelize_for_sampling` attaches both to
the DiT as hooks, so the pipeline and the model are the same as in one process. Every rank
loads the models, encodes the text (and the image) and steps the same latents; rank 0 alone
decodes and writes the outputs, the other ranks write nothing (their :class:`GenerateResult`
has ``video = sheet = None``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
from PIL import Image

from mugv.config import ConfigError, check_num_frames, pick_device
from mugv.pipeline import MUGVPipeline, frame_size, num_frames_for, resolve_checkpoint, save_video

__all__ = ["GenerateResult", "contact_sheet", "generate", "generate_released", "resolve_checkpoint"]


@dataclass
class GenerateResult:
    """What :func:`generate` wrote (the mp4 and the contact sheet; ``None`` on the ranks other
    than 0 of a parallel run, which write nothing), the clip's size and the wall time in seconds."""

    video: str | None
    sheet: str | None
    frames: int
    height: int
    width: int
    seconds: float


def contact_sheet(frames: np.ndarray, path: str | Path, max_frames: int = 8, columns: int = 4) -> Path:
    """Save up to ``max_frames`` evenly spaced frames of ``uint8 [T, H, W, 3]`` as a PNG grid."""
    t, h, w, _ = frames.shape
    idx = np.linspace(0, t - 1, min(max_frames, t)).round().astype(int)
    cols = min(columns, len(idx))
    rows = -(-len(idx) // cols)
    sheet = np.full((rows * h + (rows - 1) * 2, cols * w + (cols - 1) * 2, 3), 255, np.uint8)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = frames[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def _sampling_device(device: str, context_parallel: int, cfg_parallel: bool, cfg: float):
    """The device of this rank; joins the process group of ``torchrun`` for a parallel run.

    Raises:
        ConfigError: ``context_parallel < 1``; ``cfg_parallel`` without guidance; a parallel
            run without ``torchrun``; a ``torchrun`` job of several ranks without a parallel flag.
    """
    from mugv.train.parallelize import init_distributed

    if context_parallel < 1:
        raise ConfigError(f"--context-parallel must be >= 1, got {context_parallel}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if context_parallel == 1 and not cfg_parallel:
        if world > 1:
            raise ConfigError(f"generate runs under torchrun with {world} ranks but without --context-parallel or "
                              "--cfg-parallel: the ranks must split the clip (cfg-parallel 2 x context-parallel = world)")
        return pick_device(device)
    if cfg_parallel and cfg == 1.0:
        raise ConfigError("--cfg-parallel splits classifier-free guidance over 2 ranks: it needs --cfg != 1")
    if world == 1:
        need = (2 if cfg_parallel else 1) * context_parallel
        raise ConfigError(f"--context-parallel / --cfg-parallel run on several ranks: launch torchrun "
                          f"--nproc-per-node {need} -m mugv.cli generate ...")
    return init_distributed(device).device


def _parallelize(pipe: MUGVPipeline, context_parallel: int, cfg_parallel: bool):
    """Attach the parallel sampling hooks to ``pipe.dit``; ``None`` for a one-process run."""
    if context_parallel == 1 and not cfg_parallel:
        return None
    from mugv.train.parallelize import parallelize_for_sampling

    try:
        return parallelize_for_sampling(pipe.dit, context_parallel=context_parallel, cfg_parallel=cfg_parallel,
                                        device_type=pipe.device.type)
    except ValueError as e:  # heads not divisible by cp: an option error
        raise ConfigError(str(e)) from e


def generate(
    checkpoint: str | Path,
    prompt: str,
    out: str | Path,
    *,
    image: str | Path | None = None,
    frames: int = 17,
    height: int = 64,
    width: int = 128,
    steps: int = 25,
    cfg: float = 4.0,
    seed: int = 0,
    fps: float | None = None,
    vae: str | Path | None = None,
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    context_parallel: int = 1,
    cfg_parallel: bool = False,
) -> GenerateResult:
    """Sample one clip and write ``out`` (mp4) and ``out`` with suffix ``.png`` (contact sheet).

    Args:
        checkpoint: run directory of ``mugv train`` or one of its checkpoint directories.
        prompt: the caption.
        out: the mp4 path.
        image: a reference image for image-to-video (its latent is the first latent frame).
        frames: frames of the clip, ``8k+1``.
        height, width: pixels, multiples of 16 (VAE 8 x patch 2).
        steps: Euler steps. cfg: classifier-free guidance scale (1 = off).
        seed: seed of the starting noise.
        fps: frame rate given to the model and the mp4 (default: the training data's).
        vae: a VAE checkpoint directory (default: the one the run's data were encoded with).
        use_ema: sample with the EMA weights (falls back to the raw ones if the run has none).
        device: auto | cpu | cuda (the fused kernels and bf16 are used on CUDA; under torchrun
            each rank's ``LOCAL_RANK`` GPU).
        context_parallel: Ulysses degree under torchrun (must divide the DiT's heads).
        cfg_parallel: the cond and uncond halves of CFG on two ranks (world = 2 x context_parallel).

    Raises:
        ConfigError: ``frames`` not ``8k+1`` for the VAE, sizes not multiples of 16, empty
            prompt, bad steps; a world size that is not ``(2 if cfg_parallel else 1) *
            context_parallel``, parallel flags without torchrun, ``cfg_parallel`` with ``cfg = 1``,
            the DiT's heads not divisible by ``context_parallel``.
        FileNotFoundError: missing checkpoint, VAE or image.
    """
    t0 = time.perf_counter()
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ConfigError(f"--height/--width must be positive multiples of 16, got {height}x{width}")
    if not prompt.strip():
        raise ConfigError("--prompt must not be empty")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if image is not None and not Path(image).exists():
        raise FileNotFoundError(f"--image {image}: no such file")
    dev = _sampling_device(device, context_parallel, cfg_parallel, cfg)
    pipe = MUGVPipeline.from_run(checkpoint, vae=vae, use_ema=use_ema, device=dev)
    check_num_frames(frames, pipe.vae.config.temporal_compression, name="--frames")
    par = _parallelize(pipe, context_parallel, cfg_parallel)
    fps = float(fps or pipe.run_fps)
    writer = par is None or par.is_writer
    arr = pipe(prompt, image=image, negative_prompt="", num_frames=frames, height=height, width=width, steps=steps,
               cfg=cfg, seed=seed, fps=fps, aes_score=None, progress=progress and writer,
               output="frames" if writer else "latents")
    if not writer:
        return GenerateResult(None, None, frames, height, width, time.perf_counter() - t0)
    arr = arr.numpy()
    out = Path(out)
    save_video(arr, out, fps=fps)
    sheet = contact_sheet(arr, out.with_suffix(".png"))
    return GenerateResult(str(out), str(sheet), int(arr.shape[0]), height, width, time.perf_counter() - t0)


def generate_released(
    released: str | Path,
    prompt: str,
    out: str | Path,
    *,
    t5: str | Path | None = None,
    image: str | Path | None = None,
    negative_prompt: str | None = None,
    aspect_ratio: str = "16:9",
    duration: str = "5s",
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    cfg: float = 4.0,
    seed: int = 42,
    fps: float = 30.0,
    video_fps: float = 20.0,
    offload: str = "none",
    device: str = "auto",
    profile: bool = False,
    progress: bool = True,
    text_encoder: Any = None,
    vae_tile: int = 0,
    context_parallel: int = 1,
    cfg_parallel: bool = False,
) -> GenerateResult:
    """Sample one clip with the released MUG-V 10B (``mugv generate --released DIR --t5 PATH``)
    and write ``out`` (mp4 at ``video_fps``), its contact sheet (``.png``) and, with ``profile``,
    ``<out>.profile.json`` (seconds and peak device memory per stage).

    Args:
        released: the ``MUG-V-inference`` directory (``dit.pt``, ``vae.pt``).
        t5: the local T5-v1.1-XXL directory (default ``$MUGV_T5_PATH``); ``text_encoder``: an
            already built encoder instead (tests).
        image: a reference image (image-to-video).
        negative_prompt: default the released sampler's.
        aspect_ratio, duration: the public 720p bucket (height:width) and length (``5s``, ``3s``);
            ``frames``/``height``/``width`` override them.
        steps, cfg, seed: public defaults 25, 4.0, 42.
        fps: the frame rate the model is conditioned on (public 30). video_fps: the mp4's frame
            rate (public 20).
        offload: ``none`` | ``model`` | ``blocks`` (see :class:`mugv.pipeline.MUGVPipeline`).
        device: auto | cpu | cuda (under torchrun each rank's ``LOCAL_RANK`` GPU).
        vae_tile: VAE spatial tiles of this many pixels (a multiple of 8, e.g. 512; 0: whole
            frames, the public output; tiles lower the VAE's memory and depart slightly from it).
        context_parallel, cfg_parallel: parallel sampling under torchrun, as :func:`generate`
            (the released DiT has 48 heads: cp in 1, 2, 3, 4, 6, 8, ...); rank 0 writes.

    Raises:
        FileNotFoundError: a missing directory, ``dit.pt``, ``vae.pt``, T5 or image (names it).
        ConfigError: an unsupported aspect ratio / duration, sizes that are not multiples of 16,
            files that are not the released checkpoints, an image that does not open; the
            parallel-sampling errors of :func:`generate`.
    """
    from mugv.diffusion import MUGV_NEGATIVE_PROMPT

    t0 = time.perf_counter()
    if not prompt.strip():
        raise ConfigError("--prompt must not be empty")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if not video_fps > 0:
        raise ConfigError(f"--video-fps must be > 0, got {video_fps}")
    if vae_tile < 0 or vae_tile % 8:
        raise ConfigError(f"--vae-tile must be 0 (off) or a positive multiple of 8 pixels, got {vae_tile}")
    if image is not None and not Path(image).exists():
        raise FileNotFoundError(f"--image {image}: no such file")
    frame_size(aspect_ratio)  # both checked before any loading
    num_frames_for(duration)
    dev = _sampling_device(device, context_parallel, cfg_parallel, cfg)
    load_start = time.perf_counter()
    pipe = MUGVPipeline.from_released(released, text_encoder if text_encoder is not None else t5, device=dev,
                                      offload=offload, progress=progress, vae_tiling=vae_tile)
    load_s = time.perf_counter() - load_start
    par = _parallelize(pipe, context_parallel, cfg_parallel)
    writer = par is None or par.is_writer
    arr = pipe(prompt, image=image, negative_prompt=MUGV_NEGATIVE_PROMPT if negative_prompt is None else
               negative_prompt, aspect_ratio=aspect_ratio, duration=duration, num_frames=frames, height=height,
               width=width, steps=steps, cfg=cfg, seed=seed, fps=fps, progress=progress and writer,
               output="frames" if writer else "latents")
    if not writer:
        H, W = (height, width) if height is not None else frame_size(aspect_ratio)
        return GenerateResult(None, None, frames or num_frames_for(duration), H, W, time.perf_counter() - t0)
    arr = arr.numpy()
    out = Path(out)
    write_start = time.perf_counter()
    save_video(arr, out, fps=video_fps)
    sheet = contact_sheet(arr, out.with_suffix(".png"))
    if profile:
        pipe.profile["load"] = {"seconds": load_s}
        pipe.profile["write"] = {"seconds": time.perf_counter() - write_start}
        pipe.profile_json(out.with_suffix(".profile.json"), frames=int(arr.shape[0]), height=int(arr.shape[1]),
                          width=int(arr.shape[2]), steps=steps, total_seconds=time.perf_counter() - t0)
    return GenerateResult(str(out), str(sheet), int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]),
                          time.perf_counter() - t0)
