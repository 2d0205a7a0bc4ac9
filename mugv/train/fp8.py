"""fp8 training of the DiT's big linears through ``torchao.float8`` (``convert_to_float8_training``).

Recipes (torchao's names): ``tensorwise`` (one dynamic scale per tensor; under FSDP2 the
weights are all-gathered in fp8, and the scales are precomputed after each optimizer step by
:func:`after_optimizer_step`) and ``rowwise`` (one scale per row, more accurate, all-gather in
the parameter dtype). Converted: the ``nn.Linear`` layers inside the DiT blocks named
``qkv``, ``proj``, ``q_linear``, ``kv_linear``, ``fc1``, ``fc2`` whose in and out features
are multiples of 16 (the fp8 GEMM's requirement); the embedders and the final layer stay in
the parameter dtype.

fp8 GEMMs need tensor cores of compute capability 8.9 or newer (Ada, Hopper).
:func:`check_fp8_device` refuses anything else with a ``ConfigError`` instead of falling back
silently; tests on CPU convert with ``emulate=True`` (torchao's emulation: the same casts and
scales, the matmul in higher precision).
"""

from __future__ import annotations

import torch
from torch import nn

from mugv.config import ConfigError

__all__ = ["FP8_LINEARS", "FP8_RECIPES", "after_optimizer_step", "apply_fp8", "check_fp8_device"]

#: Values of ``--fp8``.
FP8_RECIPES = ("none", "tensorwise", "rowwise")
#: Names (last component) of the block linears converted to fp8.
FP8_LINEARS = ("qkv", "proj", "q_linear", "kv_linear", "fc1", "fc2")


def check_fp8_device(device: torch.device) -> None:
    """Raise unless ``device`` has fp8 tensor cores (CUDA, compute capability >= 8.9).

    Raises:
        ConfigError: a CPU (or other non-CUDA) device, or an older GPU (the message names it).
    """
    if device.type != "cuda":
        raise ConfigError(f"--fp8 needs a CUDA GPU with fp8 tensor cores (sm_89 or newer); this run is on {device}")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ConfigError(f"--fp8 needs fp8 tensor cores (compute capability >= 8.9); "
                          f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


def _is_big_linear(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear) or "blocks." not in fqn or fqn.rsplit(".", 1)[-1] not in FP8_LINEARS:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: nn.Module, recipe: str, *, fsdp: bool = False, emulate: bool = False) -> list[str]:
    """Swap the big block linears of ``model`` for torchao ``Float8Linear`` (in place).

    Args:
        model: a DiT (before FSDP, activation checkpointing and compile).
        recipe: ``"tensorwise"`` or ``"rowwise"`` (``"none"``: nothing changes).
        fsdp: with ``tensorwise``, all-gather the weights in fp8 under FSDP2.
        emulate: torchao's emulation (CPU tests), no fp8 hardware needed.

    Returns:
        The qualified names of the converted linears.

    Raises:
        ConfigError: an unknown recipe.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8 must be {' | '.join(FP8_RECIPES)}, got {recipe!r}")
    if recipe == "none":
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp, emulate=emulate)
    else:
        config = Float8LinearConfig.from_recipe_name("rowwise")
        config = Float8LinearConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "emulate": emulate})
    names = [n for n, m in model.named_modules() if _is_big_linear(m, n)]
    convert_to_float8_training(model, config=config, module_filter_fn=_is_big_linear)
    return names


def after_optimizer_step(model: nn.Module, recipe: str, fsdp: bool) -> None:
    """With ``tensorwise`` under FSDP2: precompute the weights' dynamic fp8 scales for the next
    all-gather (``torchao.float8.precompute_float8_dynamic_scale_for_fsdp``); else nothing."""
    if recipe == "tensorwise" and fsdp:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
