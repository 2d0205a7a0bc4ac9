"""The enhancer's LoRA (public ``mug_enhancer/predict.py``: ``peft.LoraConfig`` on
``q,k,v,o,ffn.0,ffn.2`` injected with ``inject_adapter_in_model``, weights from
``pytorch_model.bin``) on :class:`mugv.models.wan.WanDiT`, through ``peft``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1):
``W x + (alpha / r) B A x`` with ``A [r, in]``, ``B [out, r]``. Merged (default) the update is
folded into ``W`` by peft's ``merge()`` and the peft layers are replaced by the plain linears
again (no cost at inference); kept separate, peft's ``lora.Linear`` layers run it per call.

The released file holds the adapter weights of the public training module, keys
``pipe.dit.<module>.lora_A.default.weight`` / ``lora_B`` (the public loader drops the first five
characters and loads the rest into its pipeline, whose DiT is ``dit``); ``dit.`` and bare
``<module>.lora_A.weight`` keys are accepted too. Keys naming a DiT parameter (e.g. a retrained
``patch_embedding2.weight``) replace that parameter, as the public loader does. The rank is read
from the ``lora_A`` shapes; alpha is not stored in the weights: it is read from a peft
``adapter_config.json`` beside the file if there is one, else taken from ``alpha`` (default
4.0, the public ``predict.py`` default its run script keeps).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DEFAULT_LORA_ALPHA", "LORA_TARGETS", "LoraInfo", "apply_lora", "read_lora"]

LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")
"""peft ``target_modules`` of the public enhancer (suffixes of module names)."""

DEFAULT_LORA_ALPHA = 4.0
"""Public ``predict.py`` default ``--lora_alpha`` (its ``run.sh`` passes only ``--lora_rank 256``)."""

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PREFIXES = ("pipe.dit.", "dit.", "module.")


@dataclass(frozen=True)
class LoraInfo:
    """What :func:`apply_lora` did: ``rank``, ``alpha``, the modules adapted, the DiT parameters
    replaced from the file, and whether the update was merged."""

    rank: int
    alpha: float
    modules: tuple[str, ...]
    replaced: tuple[str, ...]
    merged: bool


def read_lora(path: str | os.PathLike) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor], dict]:
    """Split a released LoRA file into ``{module: (A [r, in], B [out, r])}``, the other (DiT
    parameter) tensors, and the peft config found beside it (``{}`` if none).

    Raises:
        FileNotFoundError: no such file (names it).
        ValueError: a module with only one of A/B, or a file with no LoRA weights.
    """
    from mugv.models.checkpoint import read_state_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {p} (expected the enhancer's pytorch_model.bin)")
    sd = read_state_dict(p)
    pairs: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key
        for pre in _PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        m = _LORA_KEY.match(k)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = value
        else:
            other[k] = value
    if not pairs:
        raise ValueError(f"{p} holds no LoRA weights (*.lora_A.*.weight / *.lora_B.*.weight); found {len(sd)} keys "
                         f"such as {sorted(sd)[:4]}")
    half = sorted(m for m, ab in pairs.items() if len(ab) != 2)
    if half:
        raise ValueError(f"{p}: LoRA modules with only one of lora_A / lora_B: {half[:4]}")
    config = {}
    cfg_file = p.parent / "adapter_config.json"
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text())
    return {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}, other, config


def apply_lora(model: nn.Module, path: str | os.PathLike, *, rank: int | None = None, alpha: float | None = None,
               merge: bool = True, target_modules: tuple[str, ...] | None = None) -> LoraInfo:
    """Load the released LoRA into ``model`` (a :class:`~mugv.models.wan.WanDiT`) through peft.

    Args:
        model: the DiT, weights loaded (any device/dtype; the adapters take its dtype).
        path: the LoRA file (``pytorch_model.bin`` / ``.safetensors``).
        rank: expected rank; None: the file's. alpha: None: ``adapter_config.json`` beside the
            file, else :data:`DEFAULT_LORA_ALPHA`.
        merge: fold ``(alpha / r) B A`` into the weights and drop the peft layers (True), or keep
            peft's separate LoRA layers (False, ``--no-merge-lora``).
        target_modules: peft targets; None: the config file's, else :data:`LORA_TARGETS`.

    Returns:
        :class:`LoraInfo`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``rank`` differs from the file's rank (or the file mixes ranks); a LoRA key
            names a module that is not a target of the model or has the wrong shape; a non-LoRA
            key is not a DiT parameter of that shape.
        TypeError: ``rank`` not an int, ``alpha`` not a number.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    pairs, other, config = read_lora(path)
    ranks = sorted({a.shape[0] for a, _ in pairs.values()})
    if len(ranks) != 1:
        raise ValueError(f"{path}: LoRA ranks differ between modules: {ranks}")
    file_rank = ranks[0]
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"rank must be an int, got {rank!r}")
        if rank != file_rank:
            raise ValueError(f"LoRA rank mismatch: {path} holds rank {file_rank} adapters (lora_A "
                             f"{tuple(next(iter(pairs.values()))[0].shape)}), but rank={rank} was given")
    if alpha is None:
        alpha = float(config.get("lora_alpha", DEFAULT_LORA_ALPHA))
    elif not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    targets = tuple(target_modules or config.get("target_modules") or LORA_TARGETS)

    params = dict(model.named_parameters())
    for k, v in other.items():
        if k not in params or params[k].shape != v.shape:
            want = tuple(params[k].shape) if k in params else "no such parameter"
            raise ValueError(f"{path}: key {k!r} {tuple(v.shape)} is neither a LoRA weight nor a DiT parameter "
                             f"({want})")
    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear) or not any(name == t or name.endswith("." + t) for t in targets):
            raise ValueError(f"{path}: LoRA weights for {name!r}, which is not a target linear of the model "
                             f"(targets {targets})")
        if a.shape[1] != lin.in_features or b.shape != (lin.out_features, file_rank):
            raise ValueError(f"{path}: LoRA shapes for {name!r} are A {tuple(a.shape)}, B {tuple(b.shape)}; the "
                             f"linear is {lin.out_features}x{lin.in_features} (rank {file_rank})")

    ref = next(model.parameters())
    with torch.no_grad():
        for k, v in other.items():
            params[k].copy_(v.to(params[k].dtype))
    cfg = LoraConfig(r=file_rank, lora_alpha=alpha, target_modules=list(targets))
    inject_adapter_in_model(cfg, model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(a.to(ref.dtype))
            layer.lora_B["default"].weight.copy_(b.to(ref.dtype))
    adapted = tuple(sorted(pairs))
    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    missing = sorted(n for n, _ in lora_layers if n not in pairs)
    if missing:
        raise ValueError(f"{path} has no LoRA weights for {len(missing)} target modules, e.g. {missing[:4]}")
    if merge:
        for name, layer in lora_layers:
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    return LoraInfo(rank=file_rank, alpha=float(alpha), modules=adapted, replaced=tuple(sorted(other)), merged=merge)
