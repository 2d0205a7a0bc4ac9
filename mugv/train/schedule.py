"""The optimizer and learning-rate schedule both trainers use.

AdamW (Loshchilov & Hutter, arXiv 1711.05101) with a linear warmup then a cosine decay to a
floor (the SGDR cosine of arXiv 1608.03983 without restarts), set per step from the shared
fields of :class:`mugv.config.RunConfig` (``lr``, ``betas``, ``weight_decay``,
``warmup_steps``, ``min_lr_ratio``, ``steps``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mugv.config import RunConfig

__all__ = ["build_optimizer", "lr_at", "set_lr"]


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps (``lr * (step + 1) / warmup``), then cosine decay from ``lr`` to ``min_ratio * lr``
    at step ``total`` (held there after)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
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
    lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
