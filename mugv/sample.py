"""``mugv generate``: text-to-video or image-to-video sampling from a training run.

Loads the DiT of a run (EMA weights by default, through ``torch.distributed.checkpoint``
in one process), the run's VAE and text encoder, samples latents with the Euler + CFG
rectified-flow sampler of :class:`mugv.diffusion.RectifiedFlow` (image-to-video: the
reference image's latent is the clean first latent frame, as in MUG-V's I2V), decodes them
and writes an mp4 (PyAV, H.264) plus a PNG contact sheet of evenly spaced frames.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mugv.config import ConfigError, check_num_frames, pick_device
from mugv.data.video import Bucket, cover_size, frames_to_tensor, tensor_to_frames, write_mp4
from mugv.diffusion import RectifiedFlow
from mugv.models import DiTConfig, MUGDiT, VideoVAE
from mugv.text import load_text_encoder
from mugv.train.checkpoint import latest_checkpoint, load_ema_weights

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


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` for a run directory (its newest checkpoint) or a checkpoint
    directory ``<run>/checkpoints/step_N``.

    Raises:
        FileNotFoundError: no ``config.json`` / no checkpoint found.
    """
    p = Path(path)
    if (p / "config.json").exists():
        step = latest_checkpoint(p)
        if step is None:
            raise FileNotFoundError(f"--checkpoint {p}: the run has no checkpoint yet")
        return p, step
    if (p / ".metadata").exists() and (p.parent.parent / "config.json").exists():
        return p.parent.parent, p
    raise FileNotFoundError(f"--checkpoint {p}: expected a run directory (with config.json) or <run>/checkpoints/step_N")


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


def _load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file -> ``float32 [1, 3, 1, H, W]`` in [-1, 1] (resize to cover + center-crop)."""
    img = Image.open(path).convert("RGB")
    ch, cw = cover_size(img.height, img.width, Bucket(height, width))
    img = img.resize((cw, ch), Image.BICUBIC)
    top, left = (ch - height) // 2, (cw - width) // 2
    arr = np.array(img)[top : top + height, left : left + width][None]
    return frames_to_tensor(np.ascontiguousarray(arr))[None]


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
    run_dir, step_dir = resolve_checkpoint(checkpoint)
    run = json.loads((run_dir / "config.json").read_text())
    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    vae_dir = vae or run.get("vae")
    if not vae_dir:
        raise FileNotFoundError("the run does not record its VAE; pass --vae")
    vae_m = VideoVAE.from_pretrained(vae_dir, device=dev)
    check_num_frames(frames, vae_m.config.temporal_compression, name="--frames")
    names = {f.name for f in fields(DiTConfig)}
    dcfg = DiTConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in run["dit"].items() if k in names})
    with torch.device("meta"):
        model = MUGDiT(dcfg, kernels=on_gpu)
    model.to_empty(device="cpu")
    load_ema_weights(step_dir, model, use_ema=use_ema)
    model = model.to(dev, torch.bfloat16 if on_gpu else torch.float32).eval()
    enc = load_text_encoder(run.get("text_encoder") or "minilm", device=dev)
    y, mask = enc([prompt]).to_padded()
    y_null, mask_null = enc([""]).to_padded()
    fps = float(fps or run.get("fps") or 8.0)
    T = vae_m.num_latent_frames(frames)
    s = vae_m.config.spatial_compression
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, dcfg.in_channels, T, height // s, width // s, generator=g).to(dev)
    cond = None
    if image is not None:
        with torch.no_grad():
            cond = vae_m.encode(_load_image(image, height, width).to(dev)).mode().float()  # [1, C, 1, h, w]
    flow = RectifiedFlow(num_sampling_steps=steps, guidance_scale=cfg,
                         use_timestep_shift=bool(run.get("train", {}).get("timestep_shift", True)),
                         spatial_compression=s)
    z = flow.sample(model, noise, y.to(dev), y_null.to(dev), mask=mask.to(dev), mask_null=mask_null.to(dev),
                    fps=torch.tensor([fps], device=dev), cond_latents=cond, height=height, width=width,
                    progress=progress)
    with torch.no_grad():
        video = vae_m.decode(z.to(vae_m.dtype), num_frames=frames)[0]  # [3, T, H, W]
    arr = tensor_to_frames(video)
    out = Path(out)
    write_mp4(arr, out, fps=fps)
    sheet = contact_sheet(arr, out.with_suffix(".png"))
    return GenerateResult(str(out), str(sheet), int(arr.shape[0]), height, width, time.perf_counter() - t0)
