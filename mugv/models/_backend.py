"""How a model's ``kernels=`` switch becomes the ``backend`` keyword of the ops it calls."""

from __future__ import annotations

from torch import nn

__all__ = ["BACKENDS", "resolve_backend", "set_module_backend"]

BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
"""What ``kernels=`` accepts besides a bool: ``"auto"`` (the Triton kernels on CUDA, the
PyTorch reference on a plain CPU and in fp64), ``"triton"``, ``"reference"``."""


def resolve_backend(kernels: bool | str) -> str:
    """``kernels`` as the ``backend`` keyword of the :mod:`mugv_kernels` ops: True ->
    ``"auto"``, False -> ``"reference"``, a name of :data:`BACKENDS` as it is.

    Raises:
        ValueError: any other value.
    """
    if isinstance(kernels, bool):
        return "auto" if kernels else "reference"
    if kernels not in BACKENDS:
        raise ValueError(f"kernels must be a bool or one of {BACKENDS}, got {kernels!r}")
    return kernels


def set_module_backend(model: nn.Module, kernels: bool | str) -> str:
    """Set ``model.kernels`` and ``model.backend``, and the ``backend`` attribute of every
    submodule that has one (convs, GroupNorms), from ``kernels`` (see :func:`resolve_backend`).

    Returns:
        The backend name.

    Raises:
        ValueError: an unknown ``kernels`` value.
    """
    model.kernels, model.backend = kernels, resolve_backend(kernels)
    for m in model.modules():
        if m is not model and hasattr(m, "backend"):
            m.backend = model.backend
    return model.backend
