"""The optimizer and learning-rate schedule both trainers use.

AdamW (Loshchilov & Hutter, arXiv 1711.05101) with a linear warmup, then one of
(``lr_schedule``):

* ``cosine`` (default): cosine decay to a floor (the SGDR cosine of arXiv 1608.03983
  without restarts);
* ``constant``: the peak rate to the end;
* ``anneal``: the peak rate, then a linear decay to zero over the last ``anneal_steps``
  steps (the annealing phase of a warmup-stable-decay schedule, e.g. MiniCPM, arXiv
  2404.06395 Sec. 4; used for the annealed supervised fine-tune).

Set per step from the shared fields of :class:`mugv.config.RunConfig` (``lr``, ``betas``,
``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``steps``, ``lr_schedule``,
``anneal_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mugv.config import RunConfig

__all__ = ["SCHEDULES", "build_optimizer", "lr_at", "set_lr"]


SCHEDULES = ("constant", "cosine", "anneal")


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
          anneal_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps (``lr * (step + 1) / warmup``), then by ``schedule``: ``"cosine"`` decays from
    ``lr`` to ``min_ratio * lr`` at step ``total`` (held there after); ``"constant"`` stays at
    ``lr``; ``"anneal"`` stays at ``lr`` until ``total - anneal_steps`` and then decays
    linearly, ``lr * (total - step) / anneal_steps``, reaching 0 at step ``total``
    (``anneal_steps`` 0 = no decay).

    Raises:
        ValueError: an unknown ``schedule`` or a negative ``anneal_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {' | '.join(SCHEDULES)}, got {schedule!r}")
    if anneal_steps < 0:
        raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "anneal":
        left = total - step
        if anneal_steps == 0 or left >= anneal_steps:
            return lr
        return lr * max(0.0, left) / anneal_steps
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: RunConfig, *,
                    foreach: bool | None = None) -> torch.optim.AdamW:
    """``AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)``;
    ``foreach``: the multi-tensor update (None = PyTorch's choice for the device)."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             foreach=foreach)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: RunConfig) -> float:
    """Set every parameter group's learning rate to :func:`lr_at` of ``step`` under
    ``cfg`` and return it."""
    lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio,
               schedule=cfg.lr_schedule, anneal_steps=cfg.anneal_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
