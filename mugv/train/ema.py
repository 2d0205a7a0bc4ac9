"""Exponential moving average of model weights, shard-aware (FSDP2 DTensors stay sharded).

``ema <- decay_t * ema + (1 - decay_t) * param`` after every optimizer step, with the usual
warmup ``decay_t = min(decay, (1 + t) / (10 + t))`` (as in timm's ``ModelEmaV2`` warmup and
the DiT / Open-Sora training scripts) so early averages are not dominated by the init.
The averages are kept in fp32 next to the (fp32, sharded) master parameters; FSDP2's
mixed precision casts only the unsharded compute copies, so the EMA sees the master weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA", "clean_name"]


def clean_name(name: str) -> str:
    """Parameter name without the wrappers' prefixes (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """EMA of the trainable parameters of ``model``.

    Args:
        model: the (possibly FSDP-sharded) model; its parameters are copied as the start.
        decay: the target decay in ``[0, 1)``; 0 makes the EMA a copy of the weights.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.

    ``state_dict()`` maps clean parameter names to tensors (DTensors under FSDP2) and is
    saved by ``torch.distributed.checkpoint`` like the model's own state.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            clean_name(n): p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad
        }

    def decay_at(self, step: int) -> float:
        """Decay used after optimizer step ``step`` (0-based), with warmup."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend the current parameters of ``model`` into the averages."""
        w = 1.0 - self.decay_at(step)
        ema, cur = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                ema.append(_local(self.shadow[clean_name(n)]))
                cur.append(_local(p.detach()).float())
        if ema:
            torch._foreach_lerp_(ema, cur, w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA.load_state_dict: missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for k, v in self.shadow.items():
                _local(v).copy_(_local(state[k]))
