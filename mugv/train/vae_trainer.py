"""``mugv train-vae``: the video VAE trained from scratch on decoded clips.

No pretrained video VAE can be downloaded here, so the ``compact`` causal VAE
(:class:`mugv.models.VideoVAE`) is trained on the clips themselves with the usual
autoencoder objective of the LDM family (Rombach et al., arXiv 2112.10752, Sec. 3):
``mse_weight * MSE + l1_weight * L1`` of the reconstruction plus ``kl_weight`` times the
KL of the posterior to ``N(0, I)`` (mean over latent elements). Batches are random
``num_frames``-frame windows of random ``crop x crop`` squares (random horizontal flips)
of the bucketed clips. At the end the per-channel latent mean/std over center crops
are measured and stored in the VAE config, so ``encode`` returns normalized latents for
the DiT and ``decode`` undoes it.

Output directory (:meth:`VideoVAE.save_pretrained`): ``vae.safetensors`` (weights),
``config.json`` (``{"vae": VAEConfig, "train": VAETrainConfig, "losses": [...]}``),
``train_vae.jsonl`` and ``tb/``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mugv.config import ConfigError, VAETrainConfig, check_num_frames, pick_device, to_dict
from mugv.data.video import VideoDecodeError, decode_video, frames_to_tensor, list_videos, make_buckets
from mugv.models.vae import VAEConfig, VideoVAE
from mugv.train.logging import MetricsLogger
from mugv.train.schedule import build_optimizer, set_lr

__all__ = ["VAETrainResult", "train_vae"]


@dataclass
class VAETrainResult:
    """What :func:`train_vae` returns: the per-step losses, the checkpoint directory and the
    wall time in seconds."""

    losses: list[float] = field(default_factory=list)
    out: str = ""
    wall_s: float = 0.0


class _ClipBank:
    """Decoded, bucketed videos in memory; draws random training windows."""

    def __init__(self, cfg: VAETrainConfig) -> None:
        buckets = make_buckets(cfg.base_resolution, tuple(cfg.aspect_ratios))
        self.videos: list[np.ndarray] = []
        self.skipped: list[tuple[str, str]] = []
        for p in list_videos(cfg.videos):
            try:
                v = decode_video(p, buckets=buckets, target_fps=cfg.fps)
            except VideoDecodeError as e:
                self.skipped.append((str(p), str(e)))
                continue
            if len(v.frames) < cfg.num_frames:
                self.skipped.append((str(p), f"too short ({len(v.frames)} frames)"))
                continue
            self.videos.append(v.frames)
        if not self.videos:
            raise ConfigError(f"train-vae: no usable video (skipped: {self.skipped})")
        side = min(min(v.shape[1], v.shape[2]) for v in self.videos)
        self.crop = min(cfg.crop, side) // 8 * 8 if cfg.crop > 0 else 0
        if cfg.crop == 0 and len({v.shape[1:3] for v in self.videos}) > 1:
            self.crop = side // 8 * 8  # different buckets cannot share a batch uncropped
        self.T = cfg.num_frames
        w = np.array([len(v) - self.T + 1 for v in self.videos], dtype=np.float64)
        self.weights = w / w.sum()

    def batch(self, n: int, g: np.random.Generator) -> torch.Tensor:
        """``float32 [n, 3, T, crop, crop]`` in [-1, 1]."""
        out = []
        for _ in range(n):
            v = self.videos[g.choice(len(self.videos), p=self.weights)]
            s = g.integers(0, len(v) - self.T + 1)
            clip = v[s : s + self.T]
            if self.crop:
                y = g.integers(0, clip.shape[1] - self.crop + 1)
                x = g.integers(0, clip.shape[2] - self.crop + 1)
                clip = clip[:, y : y + self.crop, x : x + self.crop]
            if g.random() < 0.5:
                clip = clip[:, :, ::-1]
            out.append(frames_to_tensor(np.ascontiguousarray(clip)))
        return torch.stack(out)

    def eval_clips(self) -> list[torch.Tensor]:
        """Center windows of every video, ``[1, 3, T, H, W]`` each (for latent statistics)."""
        out = []
        for v in self.videos:
            for s in range(0, len(v) - self.T + 1, self.T):
                out.append(frames_to_tensor(v[s : s + self.T])[None])
        return out


def train_vae(cfg: VAETrainConfig) -> VAETrainResult:
    """Train the VAE of ``cfg.preset`` from scratch (see the module docstring).

    Raises:
        ConfigError: the ``"mugv-released"`` preset (loaded, not trained here), ``num_frames``
            not ``8k+1`` for the preset's temporal compression, no
            usable video, bad options, or launched under ``torchrun`` with several ranks (the
            VAE trains in one process).
        FloatingPointError: a non-finite loss or gradient.
    """
    vae_cfg = VAEConfig.from_preset(cfg.preset)
    if vae_cfg.arch == "mugv-released":
        raise ConfigError("train-vae trains the 'compact' or 'mugv-compat' VAE; 'mugv-released' is the released "
                          "two-stage VAE: load its vae.pt with VideoVAE.from_released (mugv generate --released)")
    check_num_frames(cfg.num_frames, vae_cfg.temporal_compression, name="num_frames")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train-vae runs in a single process (the compact VAE is small); launch it without torchrun")
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    bank = _ClipBank(cfg)
    vae = VideoVAE(vae_cfg, kernels=device.type == "cuda").to(device).train()
    opt = build_optimizer(vae.parameters(), cfg)
    g = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = Path(cfg.out)
    log = MetricsLogger(out, cfg.steps, tensorboard=cfg.tensorboard, log_every=cfg.log_every, name="train_vae",
                        device=device)
    losses: list[float] = []
    try:
        for step in range(cfg.steps):
            lr = set_lr(opt, step, cfg)
            x = bank.batch(cfg.batch_size, g).to(device)
            rec, post, _ = vae(x, sample_posterior=True, generator=gen)
            diff = rec.float() - x
            mse, l1 = diff.pow(2).mean(), diff.abs().mean()
            kl = post.kl().sum() / post.mean.numel()
            loss = cfg.mse_weight * mse + cfg.l1_weight * l1 + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not (torch.isfinite(loss) and torch.isfinite(gn)):
                raise FloatingPointError(f"train-vae: non-finite loss/grad at step {step}; lower --lr")
            opt.step()
            losses.append(loss.item())
            log.step(step + 1, losses[-1], lr=lr, grad_norm=gn.item(), tokens=x[:, 0].numel(),
                     mse=mse.item(), l1=l1.item(), kl=kl.item())
        # latent statistics over deterministic center windows -> normalization in the config
        vae.eval()
        with torch.no_grad():
            zs = [vae.encode(c.to(device), normalize=False).mean.float() for c in bank.eval_clips()]
        flat = torch.cat([z.transpose(0, 1).reshape(z.shape[1], -1) for z in zs], dim=1)  # [C, N]
        mean, std = flat.mean(1), flat.std(1).clamp_min(1e-4)
        trained = VideoVAE(VAEConfig(**{**vae.config.to_dict(), "latent_mean": mean.tolist(),
                                        "latent_std": std.tolist()}))
        trained.load_state_dict(vae.state_dict())
        trained.save_pretrained(out, {"train": to_dict(cfg), "losses": losses, "skipped": bank.skipped})
    finally:
        log.close()
    return VAETrainResult(losses, str(out), time.perf_counter() - t0)
