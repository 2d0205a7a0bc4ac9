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
    "enhance_file",
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


def _resolve_enhancer(directory: Path) -> tuple[Path, Path | None]:
    """``(dit_i2v.safetensors, pytorch_model.bin or None)`` in ``directory`` or its ``enhancer/``."""
    for d in (directory, directory / "enhancer"):
        if (d / "dit_i2v.safetensors").is_file():
            lora = next((d / n for n in ("pytorch_model.bin", "pytorch_model.safetensors") if (d / n).is_file()), None)
            return d / "dit_i2v.safetensors", lora
    raise FileNotFoundError(f"{directory / 'dit_i2v.safetensors'} not found (nor in {directory / 'enhancer'}): "
                            "--released must be the MUG-V-inference directory or its enhancer/ folder, holding "
                            "dit_i2v.safetensors and pytorch_model.bin")


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class EnhancePipeline:
    """The MUG-V enhancer end to end: video in, refined video out (module docstring).

    Args:
        dit: :class:`mugv.models.wan.WanDiT` (LoRA applied). vae: :class:`mugv.models.wan_vae.WanVAE`.
        text_encoder: callable ``list[str] -> TextEmbeddings`` (umT5-XXL; :func:`mugv.text.load_umt5`).
        device: where the models run.

    After a call, ``last_timings`` holds seconds per stage (``encode_text``, ``encode_video``,
    ``denoise``, ``decode``) and ``peak_memory_gib`` (CUDA only, else None).
    """

    def __init__(self, dit: Any, vae: Any, text_encoder: Any, *, device: torch.device | str = "cpu") -> None:
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.last_timings: dict[str, float] = {}
        self.peak_memory_gib: float | None = None

    @classmethod
    def from_released(cls, directory: str | os.PathLike, wan_dir: str | os.PathLike, *,
                      device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                      kernels: bool | str = True, merge_lora: bool = True, lora_rank: int | None = None,
                      lora_alpha: float | None = None, text_encoder: Any = None, tiling: bool = True) -> EnhancePipeline:
        """The released enhancer: ``directory`` (MUG-V-inference or its ``enhancer/``) holds
        ``dit_i2v.safetensors`` and ``pytorch_model.bin`` (the LoRA); ``wan_dir`` is Wan2.1-T2V-1.3B
        (``Wan2.1_VAE.pth`` or ``vae/``; umT5 as ``text_encoder/`` + ``tokenizer/``).

        Args:
            device: default CUDA when available. dtype: default bf16 on CUDA, fp32 on CPU.
            kernels: the ``mugv`` ops (DiT and VAE convs). merge_lora: fold the LoRA into the
                weights (False: peft's separate layers). lora_rank, lora_alpha: see
                :func:`mugv.models.wan_lora.apply_lora`. text_encoder: an encoder object instead of
                the umT5 in ``wan_dir``. tiling: tiled VAE.

        Raises:
            FileNotFoundError: a missing file or directory (names it).
            ValueError: files that are not the released layouts; a LoRA rank mismatch.
        """
        from mugv.models.wan import load_wan_dit
        from mugv.models.wan_lora import apply_lora
        from mugv.models.wan_vae import load_wan_vae

        d, w = Path(directory), Path(wan_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--released {d}: not a directory")
        if not w.is_dir():
            raise FileNotFoundError(f"--wan {w}: not a directory (expected Wan2.1-T2V-1.3B)")
        dit_path, lora_path = _resolve_enhancer(d)
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
        dt = dtype if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if text_encoder is None:
            from mugv.text import load_umt5

            text_encoder = load_umt5(w, device=dev, dtype=dt)  # first: a missing umT5 fails before big loads
        vae = load_wan_vae(w, device=dev, dtype=dt, kernels=kernels, tiling=tiling)
        dit = load_wan_dit(dit_path, device=dev, dtype=dt, kernels=kernels)
        if lora_path is not None:
            apply_lora(dit, lora_path, rank=lora_rank, alpha=lora_alpha, merge=merge_lora)
        return cls(dit, vae, text_encoder, device=dev)

    def _text(self, prompt: str) -> Tensor:
        emb = self.text_encoder([" ".join(prompt.split())])
        return emb.split()[0].unsqueeze(0).to(self.device)

    @staticmethod
    def fit(frames: Tensor, *, resize: bool = False) -> Tensor:
        """Check (or make) ``uint8 [T, H, W, 3]`` frames fit the enhancer: ``T = 4k + 1`` (the VAE's
        causal 4x time compression), H and W multiples of 16 (8x VAE x 2x patch). ``resize``: keep
        the first ``4k + 1`` frames and center-crop H and W down to multiples of 16.

        Raises:
            ValueError: frames that do not fit and ``resize`` is False (names the size and the rule).
        """
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"video must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        T, H, W = frames.shape[:3]
        fits = (T - 1) % 4 == 0 and H % 16 == 0 and W % 16 == 0
        if fits:
            return frames
        if T < 1 or H < 16 or W < 16:
            raise ValueError(f"video of {T} frames at {H}x{W} is too small for the enhancer (>= 1 frame, 16x16)")
        if not resize:
            raise ValueError(f"video of {T} frames at {H}x{W} does not fit the enhancer: it needs 4k+1 frames and a "
                             "height and width that are multiples of 16; pass resize=True (--resize) to keep the "
                             f"first {(T - 1) // 4 * 4 + 1} frames and center-crop to {H // 16 * 16}x{W // 16 * 16}")
        h, w = H // 16 * 16, W // 16 * 16
        top, left = (H - h) // 2, (W - w) // 2
        return frames[: (T - 1) // 4 * 4 + 1, top : top + h, left : left + w]

    @torch.no_grad()
    def __call__(self, video: Tensor, prompt: str, *, negative_prompt: str = ENHANCE_NEGATIVE_PROMPT,
                 sigma: float = 0.3, cfg: float = 2.0, steps: int = 1, shift: float = 1.0, seed: int = 0,
                 resize: bool = False) -> Tensor:
        """Enhance ``video`` (uint8 ``[T, H, W, 3]``, see :meth:`fit`).

        Returns:
            uint8 ``[T', H', W', 3]`` on the CPU (the fitted size).

        Raises:
            ValueError: a video that does not fit (:meth:`fit`), bad schedule values.
        """
        frames = self.fit(torch.as_tensor(video), resize=resize)
        times: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def lap(name: str, t0: float) -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            times[name] = t - t0
            return t

        t = time.perf_counter()
        pos = self._text(prompt)
        neg = self._text(negative_prompt) if float(cfg) != 1.0 else None
        t = lap("encode_text", t)
        x = frames.to(self.device).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0  # [1, 3, T, H, W]
        z0 = self.vae.encode(x)
        t = lap("encode_video", t)
        g = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn(z0.shape, generator=g, dtype=torch.float32).to(self.device)
        z = enhance_latents(self.dit, z0, noise, pos, neg, sigma=sigma, steps=steps, shift=shift, cfg=cfg)
        t = lap("denoise", t)
        out = self.vae.decode(z)[0]  # [3, T, H, W] in [-1, 1]
        lap("decode", t)
        self.last_timings = times
        self.peak_memory_gib = _peak_gib(self.device)
        return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


def enhance_file(pipe: EnhancePipeline, input_path: str | os.PathLike, prompt: str, out: str | os.PathLike, *,
                 fps: float | None = None, **kwargs: Any) -> Path:
    """Decode ``input_path`` (PyAV, source size and rate), enhance it, write ``out`` (H.264 mp4 at
    ``fps``, default the input's rate).

    Raises:
        FileNotFoundError: no input file. ValueError: as :meth:`EnhancePipeline.__call__`.
    """
    from mugv.data.video import decode_video, write_mp4

    src = Path(input_path)
    if not src.is_file():
        raise FileNotFoundError(f"--input {src}: no such file")
    import av

    with av.open(str(src)) as c:
        st = c.streams.video[0]
        h0, w0 = st.codec_context.height, st.codec_context.width
    from mugv.data.video import Bucket

    dec = decode_video(src, bucket=Bucket(h0, w0))  # source size: fitting is EnhancePipeline.fit's job
    frames = pipe(torch.from_numpy(dec.frames), prompt, **kwargs)
    return write_mp4(frames.numpy(), out, fps=fps or dec.fps, crf=17)
