"""``mugv generate --checkpoint RUN``: text-to-video or image-to-video sampling from a training run.

Builds :meth:`mugv.pipeline.MUGVPipeline.from_run` (the DiT of a run, EMA weights by default,
the run's VAE and text encoder), samples one clip through the same pipeline as the released
model (image-to-video: the reference image's latent is the clean first latent frame; the empty
caption as the unconditional text, no aesthetic suffix) and writes an mp4 (PyAV, H.264) plus a
PNG contact sheet of evenly spaced frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mugv.config import ConfigError, check_num_frames, pick_device
from mugv.pipeline import MUGVPipeline, resolve_checkpoint, save_video

__all__ = ["GenerateResult", "contact_sheet", "generate", "resolve_checkpoint"]


@dataclass
class GenerateResult:
    """What :func:`generate` wrote (the mp4 and the contact sheet), the clip's size and the
    wall time in seconds."""

    video: str
    sheet: str
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
        device: auto | cpu | cuda (the fused kernels and bf16 are used on CUDA).

    Raises:
        ConfigError: ``frames`` not ``8k+1`` for the VAE, sizes not multiples of 16, empty
            prompt, bad steps.
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
    pipe = MUGVPipeline.from_run(checkpoint, vae=vae, use_ema=use_ema, device=pick_device(device))
    check_num_frames(frames, pipe.vae.config.temporal_compression, name="--frames")
    fps = float(fps or pipe.run_fps)
    arr = pipe(prompt, image=image, negative_prompt="", num_frames=frames, height=height, width=width, steps=steps,
               cfg=cfg, seed=seed, fps=fps, aes_score=None, progress=progress).numpy()
    out = Path(out)
    save_video(arr, out, fps=fps)
    sheet = contact_sheet(arr, out.with_suffix(".png"))
    return GenerateResult(str(out), str(sheet), int(arr.shape[0]), height, width, time.perf_counter() - t0)
