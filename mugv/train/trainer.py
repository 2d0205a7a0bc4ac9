"""``mugv train``: rectified-flow training of the DiT on preprocessed latent shards.

One step, per rank (the recipe of MUG-V, arXiv 2510.17519 Sec. 4, and its public
``mug_v`` training code; rectified flow after Liu et al. 2022 / SD3, arXiv 2403.03206):

1. The packing sampler gives this rank's clips for the global step (token budget, balanced),
   from the stage's data directories at their ``data_weights``, after the ``buckets`` filter
   (:class:`~mugv.data.shards.LatentMixture`).
2. Per clip (randomness drawn from ``(seed, step, clip index)``, so it does not depend on
   which rank holds the clip, and a resumed run draws the same numbers), first the task: a
   one-frame clip (an image) is text-to-image (``t2i``); a video clip is image-to-video
   (``i2v``) with probability ``i2v_ratio``, ``t2i`` on its first latent frame alone with
   probability ``t2i_ratio`` (the causal VAE encodes frame 0 by itself, so that latent frame is
   an image's latent), else text-to-video (``t2v``). Then ``t`` ~ shifted logistic-normal
   (the shift of the frames trained), ``eps ~ N(0, I)``, ``x_t = (1 - t) x_0 + t eps``,
   velocity target ``eps - x_0`` (the pieces of :mod:`mugv.diffusion`, applied per packed
   clip); under ``i2v`` the first latent frame stays clean (``x_mask`` False: the ``t0``
   modulation) and is left out of the loss; with probability ``caption_dropout`` the caption
   becomes the empty caption (for classifier-free guidance). The public trainer tags each
   sample with one of these tasks (``task_type``) and marks conditioning frames in ``x_mask``;
   how it chooses the task is not in its released code (its dataset tags every clip ``t2v``).
3. One packed forward (:meth:`MUGDiT.forward_packed`, ``cu_seqlens``) over the rank's clips.
4. Loss = ``sum_c w_task(c) * (sum of squared velocity errors over the noised frames of
   clip c)`` / the number of such elements in the *global* batch (all ranks; not weighted),
   with ``w`` = ``t2i_loss_weight`` (0.3 as in the public trainer, which scales the loss sum
   of its text-to-image batches by 0.3 and leaves the normalizer alone), ``t2v_loss_weight``,
   ``i2v_loss_weight``; times the world size because FSDP averages
   gradients: the gradient equals a single process's on the union of the batches. Under
   context parallelism (:mod:`mugv.train.context_parallel`) the ``cp`` ranks of a group hold
   the same micro-batch, so it is counted ``cp`` times in the statistics and its gradient
   ``cp`` times by the all-gather's backward: the same formula stays exact.
5. Non-finite loss or gradient norm: the step is skipped (no update, counted); after
   ``max_bad_steps`` in a row the run stops with an error. Otherwise clip, AdamW step with a
   warmup + cosine learning rate (:mod:`mugv.train.schedule`), EMA update.

Parallelism (FSDP2, activation checkpointing, compile) comes from
:mod:`mugv.train.parallelize`; the run state on disk from :mod:`mugv.train.checkpoint`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from mugv.config import ConfigError, TrainConfig, to_dict
from mugv.data.sampler import PackedStep, PackingSampler
from mugv.data.shards import LatentDataset, LatentMixture
from mugv.diffusion import add_noise, logistic_normal, shift_ratio, timestep_shift, velocity_target
from mugv.models import DiTConfig, MUGDiT
from mugv.profiling import TorchProfile, nvtx_range, parse_profile_steps
from mugv.train import checkpoint as ckpt
from mugv.train import fp8
from mugv.train import runs
from mugv.train.ema import EMA
from mugv.train.logging import MetricsLogger, dit_train_flops
from mugv.train.parallelize import (DistInfo, ParallelDims, build_mesh, build_model, fsdp_mesh, init_distributed,
                                    parallelize_dit, resolve_dtype)
from mugv.train.schedule import build_optimizer, set_lr

__all__ = ["TASKS", "NonFiniteLossError", "StepResult", "TrainResult", "Trainer", "check_task_mix", "clip_randomness",
           "task_of", "train"]

#: The training tasks, in the order of their probabilities and loss weights.
TASKS = ("t2i", "t2v", "i2v")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm."""


def _seed_of(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class ClipDraw:
    """Random choices for one clip at one step (see :func:`clip_randomness`).

    Attributes:
        t: diffusion time in ``(0, 1)``.
        noise: ``float32 [C, T', h, w]``, ``T'`` = the frames trained (1 for ``t2i``).
        i2v: the task is ``i2v``.
        drop_caption: train on the empty caption.
        task: ``"t2i"``, ``"t2v"`` or ``"i2v"``.
    """

    t: float
    noise: torch.Tensor
    i2v: bool
    drop_caption: bool
    task: str = "t2v"


def check_task_mix(i2v_ratio: float, t2i_ratio: float, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    """Check a task mix: ``i2v_ratio`` and ``t2i_ratio`` in ``[0, 1]`` with a sum <= 1 (t2v
    takes the rest) and the per-task loss ``weights`` (t2i, t2v, i2v) >= 0.

    Raises:
        ConfigError: a probability outside ``[0, 1]``, a sum above 1, a negative weight.
    """
    for name, v in (("i2v_ratio", i2v_ratio), ("t2i_ratio", t2i_ratio)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    if i2v_ratio + t2i_ratio > 1.0 + 1e-9:
        raise ConfigError(f"i2v_ratio + t2i_ratio must be <= 1 (t2v takes the rest), got {i2v_ratio} + {t2i_ratio}")
    for name, v in zip(("t2i_loss_weight", "t2v_loss_weight", "i2v_loss_weight"), weights):
        if not v >= 0.0:
            raise ConfigError(f"{name} must be >= 0, got {v}")


def clip_randomness(seed: int, step: int, clip: int, shape: tuple[int, ...], *, shift: float | None,
                    i2v_ratio: float, caption_dropout: float, t2i_ratio: float = 0.0,
                    image_shift: float | None = None) -> ClipDraw:
    """Draw the task, ``t``, the noise and caption dropout of one clip of latent ``shape``
    ``(C, T, h, w)``, from a generator seeded by ``(seed, step, clip)`` only.

    The task: ``T == 1`` (an image) is ``t2i``; otherwise one uniform ``u`` gives ``i2v`` when
    ``u < i2v_ratio``, ``t2i`` (the first latent frame alone) when ``u < i2v_ratio +
    t2i_ratio``, else ``t2v``. ``t`` is logistic-normal (:func:`mugv.diffusion.logistic_normal`,
    SD3 Sec. 3.1), then shifted by the ratio ``shift`` (:func:`mugv.diffusion.timestep_shift`;
    None = no shift), or by ``image_shift`` when a video clip is drawn ``t2i`` (None: ``shift``,
    as for the other tasks; the trainer passes the one-frame ratio). The noise is
    drawn for the whole ``shape`` and cut to the first latent frame for ``t2i`` (the same
    stream whatever the task).
    """
    g = torch.Generator().manual_seed(_seed_of(seed, step, clip))
    u = torch.rand(2, generator=g)
    if shape[1] == 1:
        task = "t2i"
    elif u[0] < i2v_ratio:
        task = "i2v"
    elif u[0] < i2v_ratio + t2i_ratio:
        task = "t2i"
    else:
        task = "t2v"
    t = logistic_normal(1, generator=g)
    s = image_shift if task == "t2i" and shape[1] > 1 and image_shift is not None else shift
    if s is not None:
        t = timestep_shift(t, s)
    noise = torch.randn(shape, generator=g)
    if task == "t2i":
        noise = noise[:, :1].contiguous()
    return ClipDraw(t=float(t.clamp(1e-5, 1 - 1e-5)), noise=noise, i2v=task == "i2v",
                    drop_caption=bool(u[1] < caption_dropout), task=task)


def task_of(target: torch.Tensor, mask: torch.Tensor) -> str:
    """The task of a prepared clip from its velocity target ``[C, T, h, w]`` and frame mask
    ``[T]`` (True = noised): one frame is ``t2i``, a clean first frame ``i2v``, else ``t2v``."""
    if target.shape[1] == 1:
        return "t2i"
    return "t2v" if bool(mask[0]) else "i2v"


@dataclass
class StepResult:
    """What :meth:`Trainer.train_step` returns.

    Attributes:
        loss: the global mean loss, or None when the step was skipped (non-finite).
        lr: the learning rate of the step.
        grad_norm: the global gradient norm before clipping (None if the loss was not finite).
        tokens: video tokens trained of each of this rank's clips (a video drawn t2i: its first frame).
        text_tokens: caption tokens of each of this rank's clips.
        tasks: the task (:data:`TASKS`) each of this rank's clips was trained on.
        task_counts: clips per task in the global batch (all ranks); logged as ``clips_<task>``.
    """

    loss: float | None
    lr: float
    grad_norm: float | None
    tokens: list[int]
    text_tokens: list[int]
    tasks: list[str] = field(default_factory=list)
    task_counts: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.loss is None


@dataclass
class TrainResult:
    """What a run returns: the per-step losses (``None`` for skipped steps) of the whole run
    (resumed runs include the earlier part), the step reached, and where things are."""

    losses: list[float | None] = field(default_factory=list)
    step: int = 0
    skipped: int = 0
    run_dir: str = ""
    checkpoint: str | None = None
    wall_s: float = 0.0


class Trainer:
    """State of a DiT training run; :meth:`fit` runs it (see the module docstring).

    Args:
        cfg: a :class:`TrainConfig`.
        dist_info: the process's rank/world/device (default: :func:`init_distributed`).

    The DiT's ``in_channels`` and ``text_dim`` are taken from the data (VAE latent channels,
    text-encoder width); ``depth``/``hidden_size``/``num_heads`` override the flavor when set.

    Models with more than ``cfg.meta_init_threshold`` parameters are built on the meta
    device, sharded, then initialized shard by shard (never whole on one rank); smaller ones
    are initialized whole on every rank with the same seed, so any world size starts from the
    weights of a single process.

    Raises:
        FileNotFoundError: no preprocessed data at ``cfg.data`` (or a ``cfg.data_dirs`` entry).
        ConfigError: inconsistent options (``fsdp="on"`` without a process group, ``fsdp="off"``
            with several ranks, an unknown dtype, clips over the token budget, ``data_weights``
            without ``data_dirs`` or not one per directory, a bad bucket pattern, a directory
            left without clips by the buckets, a task mix that :func:`check_task_mix` refuses).
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None) -> None:
        try:
            parse_profile_steps(cfg.profile_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        dev = self.dist.device
        if cfg.threads > 0 and dev.type == "cpu":
            torch.set_num_threads(cfg.threads)
        check_task_mix(cfg.i2v_ratio, cfg.t2i_ratio, (cfg.t2i_loss_weight, cfg.t2v_loss_weight, cfg.i2v_loss_weight))
        if cfg.data_weights and not cfg.data_dirs:
            raise ConfigError("data_weights needs data_dirs (one weight per directory)")
        self.data_dirs = [Path(d) for d in (cfg.data_dirs or [cfg.data])]
        if cfg.data_weights and len(cfg.data_weights) != len(self.data_dirs):
            raise ConfigError(f"data_weights: expected one weight per data directory ({len(self.data_dirs)}), got "
                              f"{len(cfg.data_weights)}")
        if len(self.data_dirs) == 1:  # one directory: the plain dataset and per-epoch permutation
            self.data = LatentDataset(self.data_dirs[0], skip_bad_clips=cfg.skip_bad_clips, buckets=cfg.buckets)
        else:
            self.data = LatentMixture(self.data_dirs, cfg.data_weights or None, cfg.buckets,
                                      skip_bad_clips=cfg.skip_bad_clips)
        if self.data.bad_clips and self.dist.is_main:
            warnings.warn(f"skipped {len(self.data.bad_clips)} bad clips of {cfg.data} (skip_bad_clips), first: "
                          f"{self.data.bad_clips[0]['reason']}", RuntimeWarning, stacklevel=2)
        overrides = {"in_channels": self.data.latent_channels, "text_dim": self.data.text_dim}
        for k in ("depth", "hidden_size", "num_heads"):
            if getattr(cfg, k):
                overrides[k] = getattr(cfg, k)
        self.init_step_dir = None
        if cfg.init_from:
            self.dit_cfg, self.init_step_dir = runs.init_config(cfg, overrides)
        else:
            self.dit_cfg = DiTConfig.from_flavor(cfg.flavor, **overrides)
        self.use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and self.dist.world_size > 1)
        if self.dist.world_size > 1 and not self.use_fsdp:
            raise ConfigError("fsdp='off' with several ranks: every rank would train its own copy; use fsdp='auto'")
        kernels = cfg.kernels == "on" or (cfg.kernels == "auto" and dev.type == "cuda")
        self.param_dtype = resolve_dtype(cfg.param_dtype, dev)
        reduce_dtype = resolve_dtype(cfg.reduce_dtype, dev)
        if self.use_fsdp and not dist.is_initialized():
            raise ConfigError("fsdp='on' needs a process group: launch with torchrun")
        dcfg = self.dit_cfg
        # ("dp_replicate", "dp_shard", "cp") mesh; a cp group shares one micro-batch
        self.dims = ParallelDims.from_world(self.dist.world_size, dp_replicate=cfg.dp_replicate, cp=cfg.context_parallel)
        if self.dims.cp > 1:
            from mugv.train.context_parallel import check_cp_heads

            check_cp_heads(dcfg.num_heads, self.dims.cp)
        mesh = build_mesh(self.dims, dev.type) if self.use_fsdp else None
        if cfg.fp8 != "none":
            fp8.check_fp8_device(dev)

        def factory():
            return MUGDiT(dcfg, kernels=kernels)

        def par(m):
            fp8.apply_fp8(m, cfg.fp8, fsdp=self.use_fsdp)
            return parallelize_dit(
                m, fsdp=self.use_fsdp, param_dtype=self.param_dtype, reduce_dtype=reduce_dtype,
                activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                mesh=fsdp_mesh(mesh) if mesh is not None else None, cp_mesh=mesh["cp"] if mesh is not None else None,
            )

        with torch.device("meta"):
            n_params = factory().num_params()
        # kept so that a subclass can build a second model sharded exactly like the policy
        # (the frozen reference of preference optimization)
        self.model_factory, self.model_parallelize = factory, par
        self.model_on_meta = n_params > cfg.meta_init_threshold
        self.model = build_model(factory, device=dev, on_meta=self.model_on_meta, seed=cfg.seed, parallelize=par)
        if self.init_step_dir is not None:
            runs.load_weights(self.init_step_dir, self.model, source="model")
        self.autocast = (not self.use_fsdp) and self.param_dtype != torch.float32
        self.optimizer = build_optimizer(self.model.parameters(), cfg, foreach=True)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.clip_tokens = [self._tokens(self.data.latent_shape(i)) for i in range(len(self.data))]
        weighted = isinstance(self.data, LatentMixture)
        self.sampler = PackingSampler(
            self.clip_tokens, cfg.token_budget * self.dims.cp, num_replicas=self.dims.dp,
            rank=self.dims.dp_rank(self.dist.rank), seed=cfg.seed,
            groups=self.data.groups if weighted else None, group_weights=self.data.weights if weighted else None,
        )
        self.null_text = self.data.null_text()
        self.step = 0
        self.losses: list[float | None] = []
        self.bad_in_row = 0
        self.skipped = 0
        self.run_dir = Path(cfg.out)
        self.matmul_params = sum(
            m.weight.numel() for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and "blocks" in n and "kv_linear" not in n
        )

    def _tokens(self, shape) -> int:
        """Video tokens of a latent ``(C, T, h, w)``: patches plus the start and end tokens."""
        p = self.dit_cfg.patch_size
        return math.ceil(shape[1] / p[0]) * math.ceil(shape[2] / p[1]) * math.ceil(shape[3] / p[2]) + 2

    # ------------------------------------------------------------------------------------
    def _batch(self, indices: tuple[int, ...], step: int):
        """Inputs of this rank for ``step``: packed lists for ``forward_packed``."""
        dev, cfg = self.dist.device, self.cfg
        lat, tgt, masks, texts, ts, fpss, n_tok_text = [], [], [], [], [], [], []
        for i in indices:
            clip = self.data[i]
            x0 = clip.latent
            C, T, h, w = x0.shape
            H, W = clip.meta["height"], clip.meta["width"]
            shift = shift_ratio(H, W, T) if cfg.timestep_shift else None
            image_shift = shift_ratio(H, W, 1) if cfg.timestep_shift else None
            d = clip_randomness(cfg.seed, step, i, tuple(x0.shape), shift=shift, i2v_ratio=cfg.i2v_ratio,
                                caption_dropout=cfg.caption_dropout, t2i_ratio=cfg.t2i_ratio, image_shift=image_shift)
            if d.task == "t2i":
                x0 = x0[:, :1]  # an image, or a video's first latent frame (frame 0 encoded alone)
                T = 1
            x_t = add_noise(x0, d.noise, d.t)
            mask = torch.ones(T, dtype=torch.bool)
            if d.i2v:
                x_t[:, 0] = x0[:, 0]
                mask[0] = False
            lat.append(x_t.to(dev))
            tgt.append(velocity_target(x0, d.noise).to(dev))
            masks.append(mask.to(dev))
            text = self.null_text if d.drop_caption else clip.text
            texts.append(text.to(dev))
            n_tok_text.append(text.shape[0])
            ts.append(d.t * 1000.0)
            fpss.append(float(clip.meta["fps"]))
        return lat, tgt, masks, texts, torch.tensor(ts, device=dev), torch.tensor(fpss, device=dev), n_tok_text

    def train_step(self, indices: tuple[int, ...]) -> StepResult:
        """One optimizer step on this rank's clips ``indices`` (collective under FSDP).

        Returns a :class:`StepResult` (``loss`` None when the step was skipped: non-finite).

        Raises:
            NonFiniteLossError: the ``max_bad_steps``-th skipped step in a row.
        """
        cfg, step = self.cfg, self.step
        lr = set_lr(self.optimizer, step, cfg)
        with nvtx_range("train.data"):
            lat, tgt, masks, texts, ts, fps, n_text = self._batch(indices, step)
        with nvtx_range("train.forward"):
            with torch.autocast(self.dist.device.type, dtype=self.param_dtype, enabled=self.autocast):
                out = self.model.forward_packed(lat, ts, texts, fps=fps, x_mask=masks)
            C = self.dit_cfg.in_channels
            sq = torch.zeros((), device=self.dist.device)
            count = torch.zeros((), device=self.dist.device)
            weight = {"t2i": cfg.t2i_loss_weight, "t2v": cfg.t2v_loss_weight, "i2v": cfg.i2v_loss_weight}
            tasks = [task_of(y, m) for y, m in zip(tgt, masks)]
            for o, y, m, task in zip(out, tgt, masks, tasks):
                err = (o[:C].float() - y).pow(2)[:, m]  # noised frames only: [C, T_noised, h, w]
                sq = sq + weight[task] * err.sum()
                count = count + err.numel()
        n_task = torch.tensor([float(tasks.count(k)) for k in TASKS], device=sq.device)
        stats = torch.cat([torch.stack([sq.detach(), count]), n_task])
        if dist.is_initialized():
            dist.all_reduce(stats)
        # a context-parallel group holds one micro-batch on cp ranks: its clips are counted cp times
        task_counts = {k: round(v / self.dims.cp) for k, v in zip(TASKS, stats[2:].tolist())}
        total = stats[1].clamp_min(1.0)
        loss = sq / total * self.dist.world_size
        mean_loss = (stats[0] / total).item()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = None
        ok = math.isfinite(mean_loss)
        if ok:
            with nvtx_range("train.backward"):
                loss.backward()
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                grad_norm = gn.item()
            ok = math.isfinite(grad_norm)
        result = StepResult(mean_loss if ok else None, lr, grad_norm, [self._tokens(x.shape) for x in lat], n_text,
                            tasks, task_counts)
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.skipped += 1
            self.step += 1
            if self.bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_in_row} consecutive steps with a non-finite loss or gradient (last at step {step}, "
                    f"loss={mean_loss}, grad_norm={grad_norm}); lower the learning rate or check the data"
                )
            return result
        self.bad_in_row = 0
        ckpt.fault_point("step", step + 1)  # test hook: a kill after the backward, before the update
        with nvtx_range("train.optimizer"):
            self.optimizer.step()
            fp8.after_optimizer_step(self.model, cfg.fp8, self.use_fsdp)
            if self.ema is not None:
                self.ema.update(self.model, step)
        self.step += 1
        return result

    # ------------------------------------------------------------------------------------
    def state_extra(self) -> dict:
        """This rank's run state besides the weights: sampler position, RNG states, losses and
        the skip counters (stored per rank by :func:`~mugv.train.checkpoint.save_run_state`)."""
        return {
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "losses": list(self.losses),
            "bad_in_row": self.bad_in_row,
            "skipped": self.skipped,
        }

    def save(self) -> Path:
        """Checkpoint the run at the current step (collective)."""
        with nvtx_range("train.checkpoint"):
            return ckpt.save_run_state(self.run_dir, self.step, self.model, self.optimizer, self.ema,
                                   self.state_extra(), keep_last=self.cfg.keep_last)

    def resume(self) -> Path | None:
        """Load the newest valid checkpoint of the run directory, if any (an incomplete or
        corrupt newer one is skipped with a warning).

        Raises:
            CheckpointError: the run has checkpoints but none is valid (with
                ``trust_unverified_checkpoint``, an unmarked one is resumed from with a warning).
        """
        path = ckpt.latest_checkpoint(self.run_dir, trust_unverified=self.cfg.trust_unverified_checkpoint)
        if path is None:
            return None
        extra = ckpt.load_run_state(path, self.model, self.optimizer, self.ema)
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        ckpt.set_rng_state(extra["rng"])
        self.losses = list(extra["losses"])
        self.bad_in_row = int(extra["bad_in_row"])
        self.skipped = int(extra["skipped"])
        return path

    def write_run_config(self) -> None:
        """``<out>/config.json``: what ``mugv generate`` needs to rebuild the model."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "train": to_dict(self.cfg),
            "dit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.dit_cfg).items()},
            "data": str(Path(self.cfg.data).resolve()),
            "data_dirs": [str(r.resolve()) for r in self.data_dirs],
            "vae": self.data.index.get("vae"),
            "text_encoder": self.data.index.get("text_encoder"),
            "fps": self.data[0].meta["fps"],
        }
        (self.run_dir / "config.json").write_text(json.dumps(info, indent=1))

    def _report_profile(self, prof: TorchProfile, window: tuple[int, int]) -> None:
        trace = prof.stop()
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(f"profile of steps {window[0]}:{window[1]}: {trace} and {prof.table_path}")

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``cfg.steps`` (resuming if asked), checkpointing on the way and at the end.

        Args:
            stop_after: stop (with a checkpoint) after this many steps of *this* call, as if
                the job were interrupted (used by tests and time-boxed runs).
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        self.write_run_config()
        if cfg.resume:
            self.resume()
        log = MetricsLogger(
            self.run_dir, cfg.steps, start_step=self.step, enabled=self.dist.is_main, tensorboard=cfg.tensorboard,
            progress=cfg.progress, log_every=cfg.log_every, name="train", device=self.dist.device,
            world_size=self.dist.world_size, keep_through=self.step,
        )
        done = 0
        last_ckpt = None
        window = parse_profile_steps(cfg.profile_steps)
        prof = TorchProfile(self.run_dir / "profile" / f"rank{self.dist.rank}") if window else None
        try:
            while self.step < cfg.steps and (stop_after is None or done < stop_after):
                if prof is not None and not prof.active and window[0] <= self.step < window[1]:
                    prof.start()
                plan: PackedStep = self.sampler.next_step()
                res = self.train_step(plan.indices)
                if prof is not None and prof.active and self.step >= window[1]:
                    self._report_profile(prof, window)
                self.losses.append(res.loss)
                done += 1
                flops = dit_train_flops(self.matmul_params, self.dit_cfg.depth, self.dit_cfg.hidden_size,
                                        res.tokens, res.text_tokens) * self.dims.dp
                log.step(self.step, float("nan") if res.skipped else res.loss, lr=res.lr, grad_norm=res.grad_norm,
                         tokens=plan.global_tokens, flops=flops, skipped=self.skipped,
                         **{f"clips_{k}": v for k, v in res.task_counts.items()})
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    log.sync()  # the metrics of every step up to a checkpoint are on disk before it
                    last_ckpt = self.save()
            latest = ckpt.latest_checkpoint(self.run_dir, verify=False,
                                            trust_unverified=cfg.trust_unverified_checkpoint)
            if done or latest is None or latest.name != f"step_{self.step:08d}":
                log.sync()
                last_ckpt = self.save()
            else:
                last_ckpt = latest  # resumed at the end: nothing new to save
        finally:
            if prof is not None and prof.active:  # the run ended inside the window
                self._report_profile(prof, window)
            log.close()
        return TrainResult(list(self.losses), self.step, self.skipped, str(self.run_dir), str(last_ckpt),
                           time.perf_counter() - t0)


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Build a :class:`Trainer` for ``cfg`` and run it (``mugv train``)."""
    return Trainer(cfg).fit(stop_after=stop_after)
