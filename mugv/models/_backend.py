"""How a model's ``kernels=`` switch becomes the ``backend`` keyword of the ops it calls."""

from __future__ import annotations

import inspect

import mugv_kernels as mk

__all__ = ["BACKENDS", "backend_kw", "resolve_backend"]

BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
"""What ``kernels=`` accepts besides a bool: ``"auto"`` (the Triton kernels on CUDA, the
PyTorch reference on a plain CPU and in fp64), ``"triton"``, ``"reference"``."""

_TAKES_BACKEND = {
    name: "backend" in inspect.signature(getattr(mk, name)).parameters
    for name in ("ada_layer_norm", "gated_residual", "gated_residual_ada_layer_norm", "qk_norm_rope3d")
}


def resolve_backend(kernels: bool | str) -> str:
    """``kernels`` as a backend name: True -> ``"auto"``, False -> ``"reference"``, a name
    of :data:`BACKENDS` as it is.

    Raises:
        ValueError: any other value.
    """
    if isinstance(kernels, bool):
        return "auto" if kernels else "reference"
    if kernels not in BACKENDS:
        raise ValueError(f"kernels must be a bool or one of {BACKENDS}, got {kernels!r}")
    return kernels


def backend_kw(op: str, backend: str) -> dict[str, str]:
    """``{"backend": backend}`` for the :mod:`mugv_kernels` op named ``op`` when it takes
    that keyword, else ``{}`` (the op then picks its path from the tensors' device)."""
    return {"backend": backend} if _TAKES_BACKEND[op] else {}
