"""NVTX ranges for Nsight Systems timelines: off by default, on with ``MUGV_NVTX=1``.

The switch is read once, when this module is imported. When it is off, :func:`range`
returns one shared no-op context manager and :func:`annotate` returns the function it
decorates unchanged, so an instrumented op costs nothing. When it is on, ranges go to the
``nvtx`` package where installed (its ``annotate`` pushes a named range in the
``"mugv"`` domain), else to ``torch.cuda.nvtx`` (``range_push`` / ``range_pop``). Inside ``torch.compile`` the
decorated functions emit no range (a range would break the graph); the profiler names
the compiled regions itself.

Usage::

    from mugv_kernels._nvtx import annotate, range as nvtx_range

    @annotate("mugv.ada_layer_norm")
    def ada_layer_norm(...): ...

    with nvtx_range("dit.block.3"):
        ...
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ENABLED", "BACKEND", "annotate", "range"]

F = TypeVar("F", bound=Callable[..., Any])

ENABLED: bool = os.environ.get("MUGV_NVTX", "0") not in ("", "0")
"""Whether ranges are emitted (``MUGV_NVTX`` set to anything but ``0`` at import)."""

_DOMAIN = "mugv"


def _backend() -> str | None:
    if not ENABLED:
        return None
    try:
        import nvtx  # noqa: F401

        return "nvtx"
    except ImportError:
        return "torch"


BACKEND: str | None = _backend()
"""``"nvtx"``, ``"torch"`` (``torch.cuda.nvtx``) or None (ranges off)."""

_NULL = contextlib.nullcontext()


class _TorchRange:
    """``torch.cuda.nvtx.range_push`` / ``range_pop`` as a context manager."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        import torch

        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.nvtx.range_pop()
        return False


def _on_range(name: str):
    if BACKEND == "nvtx":
        import nvtx

        return nvtx.annotate(name, domain=_DOMAIN)
    return _TorchRange(name)


def range(name: str):  # noqa: A001 - the NVTX term
    """A context manager that marks ``name`` on the timeline (a shared no-op when off)."""
    if not ENABLED:
        return _NULL
    return _on_range(name)


def annotate(name: str) -> Callable[[F], F]:
    """Decorator: run the function inside ``range(name)``. When ranges are off it returns
    the function itself (no wrapper, no per-call cost)."""

    def decorate(fn: F) -> F:
        if not ENABLED:
            return fn

        import torch

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():  # a range would break the graph: none inside compile
                return fn(*args, **kwargs)
            with _on_range(name):
                return fn(*args, **kwargs)

        wrapper.__wrapped_nvtx__ = name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
