"""How every ``mugv`` op is registered and how its Triton kernels are launched.

One helper decides, per backend, how an op runs:

=====================================  ==================================================
where                                  how the op runs
=====================================  ==================================================
CUDA tensors                           ``torch.library.triton_op`` + ``wrap_triton``: the
                                       compiler sees the kernel, no graph break
CPU tensors, ``TRITON_INTERPRET=1``    the same Triton kernel run by Triton's interpreter,
                                       registered with ``custom_op`` + ``register_fake``
                                       (``triton_op`` breaks opcheck/compile there)
CPU tensors otherwise, fp64 anywhere   the PyTorch reference (fp64 exists for gradcheck)
=====================================  ==================================================

Op bodies are written once: they call :func:`use_triton` to pick the kernel or the
reference, and launch kernels through :func:`launch`. The ahead-of-time compile check
(:mod:`mugv_kernels.aot`) runs the same launchers on ``meta`` tensors inside
:func:`capture_launches`, so the specializations it compiles for sm_90a are exactly
the ones the ops launch; :func:`is_capturing` tells a launcher that it is being recorded.

Every public op takes ``backend=``; :func:`check_backend` resolves it the same way for
all families (``"auto"``, ``"triton"``, ``"reference"``, and ``"cuda"`` where a family has
a ``csrc`` kernel, loaded by :func:`cuda_extension`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "AOT_CASES",
    "CSRC_BACKENDS",
    "INTERPRET",
    "KERNEL_BACKENDS",
    "LaunchRecord",
    "capture_launches",
    "check_backend",
    "cuda_extension",
    "is_capturing",
    "launch",
    "mugv_op",
    "register_aot_cases",
    "use_triton",
]

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton's interpreter runs kernels on the CPU (read once, at import)."""


@dataclass
class LaunchRecord:
    """One kernel launch seen by :func:`capture_launches` (used by the AOT check)."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)


_capture: list[LaunchRecord] | None = None


@contextlib.contextmanager
def capture_launches() -> Iterator[list[LaunchRecord]]:
    """Record kernel launches instead of running them.

    Inside this context :func:`use_triton` is true for every tensor (``meta`` tensors
    included) and :func:`launch` appends a :class:`LaunchRecord` to the yielded list.
    """
    global _capture
    previous, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = previous


def is_capturing() -> bool:
    """True inside :func:`capture_launches`: launches are recorded, not run, and launchers
    pick the tile sizes of the GPU (the ones the AOT check compiles) whatever the device."""
    return _capture is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op given tensor ``t`` runs its Triton kernel (else the reference).

    float64 always runs the reference: the kernels compute in fp32, and fp64 exists for
    ``gradcheck``.
    """
    if is_capturing():
        return True
    if t.dtype == torch.float64:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def launch(kernel: Any, grid: tuple) -> Callable[..., None]:
    """``kernel[grid]`` for the current mode: ``wrap_triton`` on GPU, direct under the
    interpreter, a recorder inside :func:`capture_launches`."""
    grid = tuple(int(g) for g in grid)
    if _capture is not None:
        sink = _capture

        def record(*args: Any, **kwargs: Any) -> None:
            sink.append(LaunchRecord(kernel, grid, args, kwargs))

        return record
    if INTERPRET:
        return kernel[grid]
    return torch.library.wrap_triton(kernel)[grid]


def mugv_op(name: str, *, fake: Callable[..., Any], mutates_args: tuple[str, ...] = ()):
    """Register ``fn`` as ``torch.ops.mugv.<name>``.

    Args:
        name: op name inside the ``mugv`` namespace.
        fake: the shape-only (meta/fake) implementation; it allocates the outputs the
            op returns and launches nothing.
        mutates_args: names of arguments the op writes into (usually none: ops
            allocate and return their outputs).

    Returns:
        A decorator turning the op body into a ``torch.library.CustomOpDef``, on which
        ``register_autograd`` is then called.
    """

    def decorate(fn: Callable[..., Any]):
        qualname = f"mugv::{name}"
        if INTERPRET:
            op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
        else:
            op = torch.library.triton_op(qualname, mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op

    return decorate


AOT_CASES: dict[str, Callable[[], None]] = {}
"""Per op family: a function that runs the family's launchers on ``meta`` tensors at the
benchmark shapes; :mod:`mugv_kernels.aot` compiles what they launch."""


def register_aot_cases(family: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: register a family's AOT cases for the sm_90a compile check."""

    def decorate(cases: Callable[[], None]) -> Callable[[], None]:
        AOT_CASES[family] = cases
        return cases

    return decorate


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------

KERNEL_BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
"""``backend=`` values every op family accepts (:func:`mugv_kernels.varlen_attention` has
its own list, see :data:`mugv_kernels.ops.varlen_attention.BACKENDS`)."""

CSRC_BACKENDS: tuple[str, ...] = (*KERNEL_BACKENDS, "cuda")
"""``backend=`` values of the families with a ``csrc`` CUDA kernel (conv3d, group_norm)."""


def cuda_extension() -> Any | None:
    """The compiled ``mugv_kernels._C`` module (``csrc/``), or None when it was not built."""
    try:
        from mugv_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def check_backend(
    backend: object,
    x: torch.Tensor,
    *,
    choices: tuple[str, ...] = KERNEL_BACKENDS,
    cuda_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
) -> str:
    """Resolve ``backend`` for input ``x``: ``"triton"``, ``"cuda"`` or ``"reference"``.

    ``"auto"`` becomes ``"triton"``: the op then runs its Triton kernel where Triton runs
    (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and its explicit PyTorch
    reference elsewhere and for fp64 (:func:`use_triton`). ``"reference"`` asks the public
    function for its differentiable PyTorch reference, with no custom op at all.

    Args:
        backend: the value passed to the op.
        x: the op's main input (its device and dtype decide what can run).
        choices: the names this family accepts (:data:`KERNEL_BACKENDS`, or
            :data:`CSRC_BACKENDS` for the families with a ``csrc`` kernel).
        cuda_dtypes: the dtypes the family's CUDA kernel takes.

    Raises:
        ValueError: a name not in ``choices`` (the message names it); ``"triton"`` where
            Triton cannot run; ``"cuda"`` without a CUDA tensor or without the built
            extension.
        TypeError: ``"cuda"`` with a dtype its kernel lacks.
    """
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if backend == "auto":
        return "triton"
    if backend == "triton" and not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {x.device}")
        if cuda_extension() is None:
            raise ValueError(
                "backend='cuda' needs the compiled extension mugv_kernels._C "
                "(reinstall with nvcc on PATH, or MUGV_BUILD_CUDA=1 to see why it did not build)"
            )
        if x.dtype not in cuda_dtypes:
            raise TypeError(f"backend='cuda' supports dtypes {cuda_dtypes}, got {x.dtype}")
    return backend
