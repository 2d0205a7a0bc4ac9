"""Loading and saving model state dicts (``.pt``/``.pth`` and ``.safetensors``).

:func:`load_checkpoint` is strict by default and, unlike ``nn.Module.load_state_dict``,
reports every missing key, every unexpected key and every shape mismatch in one
:class:`CheckpointMismatchError` before touching the model. It loads into a model built
on the meta device too (the tensors are assigned, not copied), so a 10B DiT never exists
twice in memory. ``.pt`` files load with ``torch.load(weights_only=True)``: a pickle that
would run code (or build any object other than tensors and plain containers) is refused
with :class:`UnsafePickleError`, never executed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["CheckpointMismatchError", "UnsafePickleError", "load_checkpoint", "read_state_dict", "save_checkpoint"]

_WRAPPER_KEYS = ("state_dict", "model", "module", "ema")
_SAFETENSORS = (".safetensors",)
_TORCH = (".pt", ".pth", ".bin")


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.pt``/``.pth``/``.bin`` weights file holds more than tensors and plain data: unpickling
    it could execute code, so it is refused (convert it to ``.safetensors`` from a trusted
    environment instead).

    Attributes:
        path: the refused file.
        reason: the first object ``torch.load(weights_only=True)`` refused (e.g. ``GLOBAL posix.system``).
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"refusing to load weights file {path}: it is a pickle that names objects other than tensors and "
            f"plain data ({reason}), and loading it could execute code. Only safetensors files and pickles "
            "that torch.load(weights_only=True) accepts are loaded; convert it to .safetensors "
            "(safetensors.torch.save_file) where you trust its source"
        )


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only message that names what it refused."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln.rstrip(".")
    return lines[-1] if lines else type(err).__name__


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model.

    Attributes:
        missing: model keys absent from the checkpoint (sorted).
        unexpected: checkpoint keys the model does not have (sorted).
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present in both.
    """

    def __init__(self, path: str, missing: list[str], unexpected: list[str], mismatched: list[tuple]):
        self.path, self.missing, self.unexpected, self.mismatched = path, missing, unexpected, mismatched
        lines = [f"checkpoint {path} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s) (in the model, not in the checkpoint):")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not in the model):")
            lines += [f"    {k}" for k in unexpected]
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es) (checkpoint vs model):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]
        super().__init__("\n".join(lines))


def _unwrap(obj: object, path: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict, looking one level into the usual wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``, ``{"ema": ...}``)."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if not obj:
            return {}
    raise ValueError(
        f"{path} does not hold a state dict (a mapping of names to tensors, possibly under one of "
        f"{list(_WRAPPER_KEYS)}); got {type(obj).__name__}"
    )


def read_state_dict(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (``torch.load``
    with ``weights_only=True``: no code is executed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown extension, or a file that holds no state dict.
        UnsafePickleError: a pickle naming anything but tensors and plain data (one that
            could execute code); it names the file and says to convert it to safetensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    lower = path.lower()
    if lower.endswith(_SAFETENSORS):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    if lower.endswith(_TORCH):
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(path, _refusal_reason(e)) from None
        return _unwrap(obj, path)
    raise ValueError(f"unknown checkpoint format {path!r}: expected one of {list(_SAFETENSORS + _TORCH)}")


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    assign: bool | None = None,
) -> tuple[list[str], list[str]]:
    """Load ``path`` into ``model`` (e.g. the public MUG-V 10B ``dit.pt`` into ``MUGDiT``).

    Args:
        model: the module to fill.
        path: ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file.
        strict: raise on any missing or unexpected key (default). Shape mismatches always raise.
        map_location: where ``torch.load``/``safetensors`` put the tensors.
        assign: replace the parameters by the loaded tensors instead of copying into them;
            default: True when the model has meta tensors (built on ``device="meta"``),
            else False (copy, keeping the model's dtype and device).

    Returns:
        ``(missing, unexpected)`` key lists (both empty when ``strict``).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_state_dict`.
        CheckpointMismatchError: (a ``ValueError``) listing ALL missing and unexpected keys
            (when ``strict``) and all shape mismatches.
    """
    sd = read_state_dict(path, map_location=map_location)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [(k, sd[k].shape, own[k].shape) for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(os.fspath(path), missing if strict else [], unexpected if strict else [], mismatched)
    if assign is None:
        assign = any(t.is_meta for t in own.values())
    if assign:
        # keep the model's dtype where it has one (a meta model still has a dtype)
        sd = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=strict, assign=assign)
    return missing, unexpected


def save_checkpoint(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Save a model's state dict (or a state dict) as ``.safetensors`` or ``.pt``/``.pth``.

    Raises:
        ValueError: an unknown extension.
    """
    path = os.fspath(path)
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    lower = path.lower()
    if lower.endswith(_SAFETENSORS):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in sd.items()}, path)
    elif lower.endswith(_TORCH):
        torch.save({k: v.detach() for k, v in sd.items()}, path)
    else:
        raise ValueError(f"unknown checkpoint format {path!r}: expected one of {list(_SAFETENSORS + _TORCH)}")
