"""Rectified flow for video latents: noising, training loss, Euler sampling with CFG and
image-to-video conditioning.

Math (Liu et al., arXiv 2209.03003; Esser et al., SD3, arXiv 2403.03206; the public
MUG-V scheduler ``mug_v/scheduler/rectified_flow.py``, from Open-Sora 1.2):

* time ``t in [0, 1]`` (0 = data, 1 = noise); the DiT receives ``timestep = t * 1000``
  (``num_timesteps``), as the public code does;
* noising ``x_t = (1 - t) x0 + t eps``;
* velocity ``dx_t/dt = eps - x0`` (``velocity="noise_minus_data"``, the default and the
  training target here). The public MUG-V sampler integrates ``z <- z + v dt`` while
  ``t`` decreases, i.e. its released DiT predicts ``x0 - eps``: use
  ``velocity="data_minus_noise"`` (or :meth:`RectifiedFlow.from_preset("mugv")`) with the
  official checkpoint;
* training times: logistic-normal ``t = sigmoid(loc + scale * n)``, ``n ~ N(0, 1)`` (SD3
  Sec. 3.1), then the resolution/duration shift of the public ``timestep_transform``:
  ``t' = r t / (1 + (r - 1) t)`` with ``r = sqrt(H W / 512^2) * sqrt(T_latent / 1) * scale``
  (``H, W`` in pixels, ``T_latent`` latent frames; bigger/longer videos get noisier times);
* sampling: ``N`` Euler steps on ``t_i = shift(1 - i/N)``, ``i = 0..N-1``, down to 0;
  classifier-free guidance ``v = v_uncond + s (v_cond - v_uncond)`` with the conditional
  and unconditional halves batched in one model call (cond first, as the public code);
* image-to-video: the first latent frame(s) hold the reference image's latent, are never
  noised and are excluded from the loss; the model gets ``x_mask [B, T]`` (True = noised
  frame, False = conditioning frame, which the DiT modulates with timestep 0, ``t0``).

The model is any callable ``model(x, timestep, y, mask=..., x_mask=..., fps=..., **kw)``
returning ``[B, C, T, H, W]`` or ``[B, 2C, ...]`` (the public DiT also predicts a variance;
the first ``C`` channels are the velocity), e.g. :class:`mugv.models.MUGDiT`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from mugv.profiling import nvtx_range
from mugv.text import TextEmbeddings

__all__ = ["MUGV_NEGATIVE_PROMPT", "RectifiedFlow", "add_noise", "flow_loss", "logistic_normal", "shift_ratio",
    "timestep_shift", "velocity_target"]

_VELOCITIES = ("noise_minus_data", "data_minus_noise")

MUGV_NEGATIVE_PROMPT = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
"""The unconditional caption the released MUG-V sampler encodes for classifier-free guidance
(public ``RFlow.sample``): encode it with the text encoder and pass it as ``y_null``."""


# ----------------------------------------------------------------------------------------
# functional pieces
# ----------------------------------------------------------------------------------------


def _bcast(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` (scalar, ``[B]`` or ``[B, T]``) shaped to broadcast against ``x [B, C, T, H, W]``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries but x has batch {x.shape[0]}")
        return t.view(-1, *([1] * (x.dim() - 1)))
    if t.dim() == 2:
        if x.dim() != 5 or tuple(t.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"per-frame t must be [B, T] = {(x.shape[0], x.shape[2])}, got {tuple(t.shape)}")
        return t[:, None, :, None, None]
    raise ValueError(f"t must be a scalar, [B] or [B, T], got shape {tuple(t.shape)}")


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) x0 + t noise``.

    Args:
        x0, noise: ``[B, C, T, H, W]`` (same shape). t: scalar, ``[B]`` or ``[B, T]`` in ``[0, 1]``.

    Raises:
        ValueError: shape mismatch.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor, velocity: str = "noise_minus_data") -> Tensor:
    """The regression target: ``noise - x0`` (``d x_t / dt``) or, for the public
    convention, ``x0 - noise``.

    Raises:
        ValueError: unknown ``velocity``.
    """
    if velocity == "noise_minus_data":
        return noise - x0
    if velocity == "data_minus_noise":
        return x0 - noise
    raise ValueError(f"velocity must be one of {_VELOCITIES}, got {velocity!r}")


def shift_ratio(height: float, width: float, num_frames: float, *, base_resolution: float = 512 * 512,
                base_num_frames: float = 1.0, scale: float = 1.0) -> float:
    """``r = sqrt(height * width / base_resolution) * sqrt(num_frames / base_num_frames) * scale``
    (public ``timestep_transform``; ``height``/``width`` in pixels, ``num_frames`` latent frames).

    Raises:
        ValueError: non-positive sizes.
    """
    if height <= 0 or width <= 0 or num_frames <= 0:
        raise ValueError(f"height, width and num_frames must be > 0, got {height}, {width}, {num_frames}")
    return math.sqrt(height * width / base_resolution) * math.sqrt(num_frames / base_num_frames) * scale


def timestep_shift(t: Tensor, ratio: float | Tensor) -> Tensor:
    """``t' = r t / (1 + (r - 1) t)`` for ``t in [0, 1]`` (keeps 0 and 1 fixed; ``r > 1``
    pushes times toward 1, the noisy end). ``ratio`` scalar or broadcastable to ``t``."""
    return ratio * t / (1 + (ratio - 1) * t)


def logistic_normal(n: int, *, loc: float = 0.0, scale: float = 1.0, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """``sigmoid(loc + scale * N(0, 1))``, ``[n]`` float32 in ``(0, 1)`` (SD3 logit-normal)."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(loc + scale * z)


def flow_loss(pred: Tensor, target: Tensor, noised: Tensor | None = None) -> Tensor:
    """Mean squared error over the noised frames only.

    Args:
        pred, target: ``[B, C, T, H, W]``.
        noised: ``[B, T]`` bool, True where the frame was noised (``x_mask``); None: all.

    Returns:
        Scalar: per sample the mean over its noised elements, then the mean over the
        samples that have at least one noised frame.

    Raises:
        ValueError: shape mismatch, or no noised frame at all.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    err = (pred.float() - target.float()).pow(2)
    if noised is None:
        return err.mean()
    if tuple(noised.shape) != (pred.shape[0], pred.shape[2]):
        raise ValueError(f"noised must be [B, T] = {(pred.shape[0], pred.shape[2])}, got {tuple(noised.shape)}")
    w = noised.to(err.dtype)[:, None, :, None, None]
    per_frame_elems = pred.shape[1] * pred.shape[3] * pred.shape[4]
    count = w.sum(dim=(1, 2, 3, 4)) * per_frame_elems
    if not bool((count > 0).any()):
        raise ValueError("flow_loss: no noised frame in the batch (x_mask is all False)")
    per_sample = (err * w).sum(dim=(1, 2, 3, 4)) / count.clamp_min(1)
    valid = count > 0
    return per_sample[valid].mean()


# ----------------------------------------------------------------------------------------
# the scheduler
# ----------------------------------------------------------------------------------------


def _velocity_from_output(out: Tensor, channels: int) -> Tensor:
    if out.dim() != 5 or out.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"the model must return [B, {channels} or {2 * channels}, T, H, W], got {tuple(out.shape)}")
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def _double(v: Any, batch: int) -> Any:
    """Repeat a per-sample model argument for the (cond, uncond) CFG batch."""
    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
        return torch.cat([v, v], dim=0)
    return v


def _pad_text_to(y: Tensor, mask: Tensor | None, L: int) -> tuple[Tensor, Tensor | None]:
    extra = L - y.shape[-2]
    if extra <= 0:
        return y, mask
    pad = y.new_zeros(*y.shape[:-2], extra, y.shape[-1])
    y = torch.cat([y, pad], dim=-2)
    if mask is not None:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1)
    return y, mask


@dataclass
class RectifiedFlow:
    """Rectified-flow training and sampling (see the module docstring for the math).

    Args:
        num_timesteps: the model's timestep scale (``timestep = t * num_timesteps``).
        num_sampling_steps: Euler steps (MUG-V: 25).
        guidance_scale: CFG scale (MUG-V: 4.0; 1.0 = no guidance, one model call).
        use_timestep_shift: apply the resolution/duration shift to training and sampling times.
        base_resolution, base_num_frames, shift_scale: the shift ratio's constants.
        t_loc, t_scale: logistic-normal parameters of the training times.
        velocity: ``"noise_minus_data"`` (target ``eps - x0``) or ``"data_minus_noise"``
            (public MUG-V / Open-Sora sign).
        spatial_compression: VAE pixels per latent pixel, to get pixel ``H, W`` for the
            shift when they are not given.

    Raises:
        ValueError: bad field values.
    """

    num_timesteps: int = 1000
    num_sampling_steps: int = 25
    guidance_scale: float = 4.0
    use_timestep_shift: bool = True
    base_resolution: float = 512 * 512
    base_num_frames: float = 1.0
    shift_scale: float = 1.0
    t_loc: float = 0.0
    t_scale: float = 1.0
    velocity: str = "noise_minus_data"
    spatial_compression: int = 8

    def __post_init__(self) -> None:
        if self.velocity not in _VELOCITIES:
            raise ValueError(f"velocity must be one of {_VELOCITIES}, got {self.velocity!r}")
        if self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")
        if self.num_timesteps <= 0 or self.t_scale <= 0 or self.spatial_compression < 1:
            raise ValueError("num_timesteps, t_scale and spatial_compression must be positive")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RectifiedFlow:
        """``"mugv"``: the released MUG-V sampler (25 steps, CFG 4.0, shift on, public
        velocity sign ``x0 - eps``); ``"default"``: the dataclass defaults.

        Raises:
            ValueError: unknown name.
        """
        if name == "mugv":
            base: dict[str, Any] = dict(num_sampling_steps=25, guidance_scale=4.0, velocity="data_minus_noise")
        elif name == "default":
            base = {}
        else:
            raise ValueError(f"unknown RectifiedFlow preset {name!r}; expected 'mugv' or 'default'")
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ times
    def _ratio(self, x: Tensor, height: float | None, width: float | None, num_frames: float | None) -> float:
        H = height if height is not None else x.shape[3] * self.spatial_compression
        W = width if width is not None else x.shape[4] * self.spatial_compression
        T = num_frames if num_frames is not None else x.shape[2]
        return shift_ratio(H, W, T, base_resolution=self.base_resolution, base_num_frames=self.base_num_frames,
                           scale=self.shift_scale)

    def sample_t(self, x0: Tensor, *, generator: torch.Generator | None = None, height: float | None = None,
                 width: float | None = None, num_frames: float | None = None) -> Tensor:
        """Training times ``[B]`` float32 in ``(0, 1)``: logistic-normal, then shifted by
        ``r`` of this latent size (``height``/``width`` pixels, default latent size times
        ``spatial_compression``; ``num_frames`` latent frames, default ``x0.shape[2]``)."""
        t = logistic_normal(x0.shape[0], loc=self.t_loc, scale=self.t_scale, generator=generator, device=x0.device)
        if self.use_timestep_shift:
            t = timestep_shift(t, self._ratio(x0, height, width, num_frames))
        return t

    def public_timesteps(self, num_steps: int | None = None, *, height: float, width: float, num_frames: float,
                         batch: int = 1, ratio_dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> list[Tensor]:
        """The sampling timesteps exactly as the public ``RFlow.sample`` computes them: per step
        ``i`` a float32 ``[batch]`` tensor ``1000 * shift((1 - i/N))`` in model units (``[0,
        num_timesteps]``), the shift ratio ``sqrt(H W / 512^2) sqrt(T / 1)`` evaluated in
        ``ratio_dtype`` (the public pipeline passes ``height``/``width``/``num_frames`` as tensors
        of its model dtype, so a bf16 model rounds the ratio to bf16) and the transform in
        float32. Pass the result as ``sample(..., timesteps=...)`` to reproduce the public
        schedule bit for bit. ``height``/``width`` in pixels, ``num_frames`` latent frames.

        Raises:
            ValueError: ``num_steps < 1`` or non-positive sizes.
        """
        n = self.num_sampling_steps if num_steps is None else int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        if height <= 0 or width <= 0 or num_frames <= 0:
            raise ValueError(f"height, width and num_frames must be > 0, got {height}, {width}, {num_frames}")
        nt = self.num_timesteps
        out = []
        for i in range(n):
            t = torch.tensor([(1.0 - i / n) * nt] * batch, device=device)
            if self.use_timestep_shift:
                h = torch.tensor([height], dtype=ratio_dtype, device=device)
                w = torch.tensor([width], dtype=ratio_dtype, device=device)
                f = torch.tensor([num_frames], dtype=ratio_dtype, device=device)
                ratio = (h * w / self.base_resolution).sqrt() * (f / self.base_num_frames).sqrt() * self.shift_scale
                tp = t / nt
                t = ratio * tp / (1 + (ratio - 1) * tp) * nt
            out.append(t.float())
        return out

    def sampling_times(self, x: Tensor, num_steps: int | None = None, *, height: float | None = None,
                       width: float | None = None, num_frames: float | None = None) -> list[float]:
        """The ``N`` Euler times ``shift(1 - i/N)``, ``i = 0..N-1`` (the last step goes to 0)."""
        n = self.num_sampling_steps if num_steps is None else int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be >= 1, got {n}")
        ts = torch.tensor([1.0 - i / n for i in range(n)], dtype=torch.float64)
        if self.use_timestep_shift:
            ts = timestep_shift(ts, self._ratio(x, height, width, num_frames))
        return ts.tolist()

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        y: Any,
        *,
        mask: Tensor | None = None,
        fps: Tensor | None = None,
        cond_frames: int | Tensor = 0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        height: float | None = None,
        width: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One rectified-flow training loss.

        Args:
            model: ``model(x_t, timestep, y, mask=mask, x_mask=x_mask, fps=fps, **model_kwargs)``.
            x0: clean latents ``[B, C, T, H, W]`` (normalized VAE latents).
            y, mask: the text condition, passed through to the model.
            fps: ``[B]`` frame rates (passed through).
            cond_frames: image-to-video: the first ``cond_frames`` latent frames (int, same
                for the batch) or a ``[B, T]`` bool mask (True = conditioning frame) are kept
                clean, get ``x_mask = False`` and are left out of the loss. 0: text-to-video
                (``x_mask`` is then not passed).
            generator: RNG for ``t`` and the noise. noise, t: give them explicitly instead
                (``[B, C, T, H, W]``, ``[B]`` in ``[0, 1]``).
            height, width: pixel size for the time shift (default latent size x
                ``spatial_compression``).

        Returns:
            ``(loss, extras)``: scalar fp32 loss; extras ``t``, ``x_t``, ``target``, ``pred``,
            ``x_mask`` (``[B, T]`` bool, True = noised).

        Raises:
            ValueError: bad shapes, ``cond_frames`` covering every frame, a model output
                that is neither ``C`` nor ``2C`` channels.
        """
        if not isinstance(x0, Tensor) or x0.dim() != 5:
            raise ValueError(f"x0 must be a 5-D [B, C, T, H, W] tensor, got {getattr(x0, 'shape', type(x0))}")
        B, C, T = x0.shape[:3]
        noised = self._noised_mask(cond_frames, B, T, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
        if t is None:
            t = self.sample_t(x0, generator=generator, height=height, width=width)
        t = t.to(device=x0.device, dtype=torch.float32)
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must be [B] = [{B}], got {tuple(t.shape)}")
        x_t = add_noise(x0, noise, t.to(x0.dtype))
        x_t = torch.where(noised[:, None, :, None, None], x_t, x0)
        kwargs = dict(model_kwargs or {})
        if not bool(noised.all()):
            kwargs["x_mask"] = noised
        out = model(x_t, t * self.num_timesteps, y, mask=mask, fps=fps, **kwargs)
        pred = _velocity_from_output(out, C)
        target = velocity_target(x0, noise, self.velocity)
        loss = flow_loss(pred, target, noised)
        return loss, dict(t=t, x_t=x_t, target=target, pred=pred, x_mask=noised)

    @staticmethod
    def _noised_mask(cond_frames: int | Tensor, B: int, T: int, device: torch.device) -> Tensor:
        if isinstance(cond_frames, Tensor):
            if cond_frames.dtype != torch.bool or tuple(cond_frames.shape) != (B, T):
                raise ValueError(f"cond_frames as a tensor must be bool [B, T] = {(B, T)}, got "
                                 f"{cond_frames.dtype} {tuple(cond_frames.shape)}")
            noised = ~cond_frames.to(device)
        else:
            if not isinstance(cond_frames, int) or not 0 <= cond_frames < T:
                raise ValueError(f"cond_frames must be an int in [0, T-1] = [0, {T - 1}], got {cond_frames!r}")
            noised = torch.ones(B, T, dtype=torch.bool, device=device)
            noised[:, :cond_frames] = False
        if not bool(noised.any(dim=1).all()):
            raise ValueError("every sample needs at least one noised (non-conditioning) frame")
        return noised

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., Tensor],
        noise: Tensor | tuple[int, ...],
        y: Any,
        y_null: Any = None,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        mask: Tensor | None = None,
        mask_null: Tensor | None = None,
        fps: Tensor | None = None,
        cond_latents: Tensor | None = None,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        height: float | None = None,
        width: float | None = None,
        num_frames: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        timesteps: list[Tensor] | Tensor | None = None,
        noise_draws: str = "none",
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Euler sampling from ``t = 1`` to 0 with classifier-free guidance.

        Args:
            model: ``model(x, timestep, y, mask=..., x_mask=..., fps=..., **model_kwargs)``.
            noise: ``[B, C, T, H, W]`` the starting noise, or its shape (a tuple): then it
                is drawn as ``torch.randn(shape, generator=generator, device=device,
                dtype=dtype)`` (seed the generator for determinism).
            y, mask: condition text for the model (a tensor ``[B, (1,) L, D]`` + ``[B, L]``
                mask, or any object the model takes, e.g. :class:`mugv.text.TextEmbeddings`).
            y_null, mask_null: the unconditional (empty / negative prompt) text; required when
                the guidance scale is not 1. Tensors of different ``L`` are zero padded
                (mask 0) to a common length; ``TextEmbeddings`` are concatenated; cond first.
            fps: ``[B]`` frame rates.
            cond_latents: image-to-video: ``[B, C, Tc, H, W]`` latents (e.g. the reference
                image's, ``Tc = 1``) fixed in the first ``Tc`` frames; those frames get
                ``x_mask = False`` (``t0`` modulation) and are never updated.
            guidance_scale, num_steps: override the scheduler's.
            height, width, num_frames: for the time shift (pixels / latent frames).
            model_kwargs: extra model arguments (tensors whose first dim is ``B`` are
                repeated for the CFG batch; e.g. ``frame_indice``).
            progress: a tqdm bar over the steps.
            timesteps: explicit descending timesteps in model units (``[0, num_timesteps]``):
                a list of ``[B]`` (or scalar) float32 tensors or one ``[N]`` tensor, e.g.
                :meth:`public_timesteps`; then ``dt = (T_i - T_{i+1}) / num_timesteps`` in
                float32 (the last step goes to 0), as the public ``RFlow.sample``.
                ``None``: :meth:`sampling_times`.
            noise_draws: ``"none"`` (default: no random numbers drawn; ``noise`` is the
                starting point) or ``"public"``: the random draws of the public
                ``RFlow.sample``, from ``generator`` on ``noise``'s device, in its order:
                one ``randn`` of ``noise``'s shape and dtype that noises the non-conditioning
                frames to the first timestep (``x = s x0 + (1 - s) eps``, ``s = 1 - T_0 /
                num_timesteps``, which is 0 at ``T_0 = 1000``: the first draw *replaces*
                ``noise`` there), then one float32 ``randn`` per step, which the public loop
                draws for re-noising and (its mask being 0/1) never uses. The latents are then
                float32 from the start, as there. Seed ``generator`` as the public code seeds
                the global generator to get its latents.
            callback: called as ``callback(i, z)`` after step ``i``.

        Returns:
            ``[B, C, T, H, W]`` latents in ``noise.dtype`` (float32 with
            ``noise_draws="public"``). With ``noise_draws="none"`` deterministic given
            ``noise`` (no random numbers are drawn inside).

        Raises:
            ValueError: bad shapes, a missing ``y_null`` with guidance, a model output of
                the wrong shape.
        """
        if isinstance(noise, (tuple, list, torch.Size)):
            noise = torch.randn(tuple(noise), generator=generator, device=device, dtype=dtype)
        if not isinstance(noise, Tensor) or noise.dim() != 5:
            raise ValueError(f"noise must be a 5-D [B, C, T, H, W] tensor, got {getattr(noise, 'shape', type(noise))}")
        if noise_draws not in ("none", "public"):
            raise ValueError(f"noise_draws must be 'none' or 'public', got {noise_draws!r}")
        B, C, T = noise.shape[:3]
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = s != 1.0
        if cfg and y_null is None:
            raise ValueError(f"guidance_scale={s} needs the unconditional text y_null")
        z = noise.clone()
        noised = torch.ones(B, T, dtype=torch.bool, device=noise.device)
        tc = 0
        if cond_latents is not None:
            if cond_latents.dim() != 5 or cond_latents.shape[0] != B or cond_latents.shape[1] != C or \
                    tuple(cond_latents.shape[3:]) != tuple(noise.shape[3:]) or not 1 <= cond_latents.shape[2] < T:
                raise ValueError(f"cond_latents must be [B, C, Tc, H, W] = [{B}, {C}, 1..{T - 1}, "
                                 f"{noise.shape[3]}, {noise.shape[4]}], got {tuple(cond_latents.shape)}")
            tc = cond_latents.shape[2]
            z[:, :, :tc] = cond_latents.to(z.dtype)
            noised[:, :tc] = False
        x_cond = z[:, :, :tc].clone()
        x_mask = None if cond_latents is None else noised

        if cfg:
            y_in, mask_in = self._cfg_text(y, mask, y_null, mask_null)
            x_mask_in = None if x_mask is None else torch.cat([x_mask, x_mask], dim=0)
            fps_in = _double(fps, B)
            kw = {k: _double(v, B) for k, v in (model_kwargs or {}).items()}
        else:
            y_in, mask_in, x_mask_in, fps_in, kw = y, mask, x_mask, fps, dict(model_kwargs or {})
        if x_mask_in is not None:
            kw["x_mask"] = x_mask_in

        nb = 2 * B if cfg else B
        if timesteps is None:
            times = self.sampling_times(noise, num_steps, height=height, width=width, num_frames=num_frames)
            ts = [torch.full((nb,), t * self.num_timesteps, device=z.device, dtype=torch.float32) for t in times]
            dts = [torch.tensor(times[i] - (times[i + 1] if i + 1 < len(times) else 0.0), dtype=torch.float32,
                                device=z.device) for i in range(len(times))]
        else:
            ts, dts = self._explicit_timesteps(timesteps, B, z.device)
            ts = [torch.cat([t, t]) if cfg else t for t in ts]
        out_dtype = noise.dtype
        if noise_draws == "public":
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            keep = 1.0 - ts[0][:B].float() / self.num_timesteps  # public add_noise: keep * x0 + (1 - keep) * eps
            keep = keep.view(-1, 1, 1, 1, 1)
            z = torch.where(noised[:, None, :, None, None], keep * z + (1 - keep) * eps, z.float())
            x_cond = z[:, :, :tc].clone()
            out_dtype = torch.float32
        steps = range(len(ts))
        if progress:
            steps = tqdm(steps, desc="sampling", unit="step")
        sign = 1.0 if self.velocity == "noise_minus_data" else -1.0
        for i in steps:
            with nvtx_range(f"sample.step.{i}"):  # a shared no-op unless MUGV_NVTX=1
                if noise_draws == "public":  # drawn (and unused) by the public loop's re-noising
                    torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z_in = torch.cat([z, z], dim=0) if cfg else z
                out = _velocity_from_output(model(z_in, ts[i], y_in, mask=mask_in, fps=fps_in, **kw), C)
                if cfg:
                    v_cond, v_uncond = out.float().chunk(2, dim=0)
                    v = v_uncond + s * (v_cond - v_uncond)
                else:
                    v = out.float()
                # dx/dt = sign * v ; step from t_cur down to t_next (dt > 0 is the decrease of t)
                z = (z.float() - sign * v * dts[i]).to(out_dtype)
                if tc:
                    z[:, :, :tc] = x_cond
                if callback is not None:
                    callback(i, z)
        return z

    def _explicit_timesteps(self, timesteps: list[Tensor] | Tensor, B: int,
                            device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
        """``[B]`` float32 timesteps and float32 ``dt`` per step from explicit model-unit timesteps."""
        if isinstance(timesteps, Tensor):
            if timesteps.dim() != 1 or timesteps.numel() < 1:
                raise ValueError(f"timesteps as a tensor must be [N], got {tuple(timesteps.shape)}")
            timesteps = list(timesteps.unbind(0))
        if len(timesteps) < 1:
            raise ValueError("timesteps must hold at least one step")
        ts = []
        for t in timesteps:
            t = torch.as_tensor(t, dtype=torch.float32).to(device).reshape(-1)
            if t.numel() == 1 and B > 1:
                t = t.expand(B)
            if t.numel() != B:
                raise ValueError(f"each timestep must be a scalar or [B] = [{B}], got {tuple(t.shape)}")
            ts.append(t)
        dts = [((ts[i] - ts[i + 1]) if i + 1 < len(ts) else ts[i]) / self.num_timesteps for i in range(len(ts))]
        return ts, [d.view(-1, 1, 1, 1, 1) for d in dts]

    @staticmethod
    def _cfg_text(y: Any, mask: Tensor | None, y_null: Any, mask_null: Tensor | None) -> tuple[Any, Tensor | None]:
        if isinstance(y, TextEmbeddings):
            if not isinstance(y_null, TextEmbeddings):
                raise ValueError("y is TextEmbeddings, so y_null must be TextEmbeddings too")
            if y_null.batch_size == 1 and y.batch_size > 1:
                y_null = TextEmbeddings.cat([y_null] * y.batch_size)
            if y_null.batch_size != y.batch_size:
                raise ValueError(f"y_null has batch {y_null.batch_size}, y has {y.batch_size}")
            return TextEmbeddings.cat([y, y_null]), None
        if not isinstance(y, Tensor) or not isinstance(y_null, Tensor):
            raise ValueError("y and y_null must both be tensors or both be TextEmbeddings")
        if y_null.shape[0] == 1 and y.shape[0] > 1:
            y_null = y_null.expand(y.shape[0], *y_null.shape[1:])
            if mask_null is not None:
                mask_null = mask_null.expand(y.shape[0], *mask_null.shape[1:])
        if y.dim() != y_null.dim() or y.shape[0] != y_null.shape[0] or y.shape[-1] != y_null.shape[-1]:
            raise ValueError(f"y {tuple(y.shape)} and y_null {tuple(y_null.shape)} must agree in batch, rank and width")
        if (mask is None) != (mask_null is None):
            if mask is None:
                mask = torch.ones(y.shape[0], y.shape[-2], dtype=mask_null.dtype, device=y.device)
            else:
                mask_null = torch.ones(y_null.shape[0], y_null.shape[-2], dtype=mask.dtype, device=y.device)
        L = max(y.shape[-2], y_null.shape[-2])
        y, mask = _pad_text_to(y, mask, L)
        y_null, mask_null = _pad_text_to(y_null, mask_null, L)
        y_in = torch.cat([y, y_null], dim=0)
        mask_in = None if mask is None else torch.cat([mask, mask_null.to(mask.dtype)], dim=0)
        return y_in, mask_in
