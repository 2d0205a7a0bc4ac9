"""Argument checks shared by the public ops: clear ``TypeError``/``ValueError`` messages
that name the argument and what was expected, raised before any kernel runs.

The contract of every op: a wrong type or a wrong dtype is a ``TypeError``; a wrong value,
shape, rank, length or device is a ``ValueError``. Also the two layout helpers the ops
share (unit stride on the last dimension, the 5-D memory format).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check_dtype",
    "check_tensor",
    "last_dim_contiguous",
    "memory_format_of",
    "triple",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Accepted floating dtypes; float64 runs the PyTorch reference (for gradcheck)."""
INDEX_DTYPES = (torch.int32, torch.int64)
"""Accepted integer dtypes of index-like tensors (positions, index, cu_seqlens)."""


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def check_dtype(name: str, t: object, dtypes: Sequence[torch.dtype]) -> None:
    """``TypeError`` when ``t`` is a tensor whose dtype is not in ``dtypes``.

    Anything else passes (None for an optional argument; a non-tensor is left to
    :func:`check_tensor`), so the dtypes of all arguments can be checked before their
    shapes.
    """
    if isinstance(t, torch.Tensor) and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {t.dtype}")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of an allowed rank, dtype and device; return it.

    Raises:
        TypeError: ``t`` is not a tensor, or its dtype is not in ``dtypes``.
        ValueError: wrong rank, or a device other than ``device``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        check_dtype(name, t, dtypes)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def triple(name: str, v: object) -> tuple[int, int, int]:
    """``(t, h, w)`` from one positive int or a sequence of three (a 3D kernel size,
    stride or dilation).

    Raises:
        TypeError: not an int or a tuple/list of three ints (bools are not ints here).
        ValueError: a length other than three, or a value < 1.
    """

    def is_int(i: object) -> bool:
        return isinstance(i, int) and not isinstance(i, bool)

    if is_int(v):
        v = (v, v, v)
    if not isinstance(v, (tuple, list)) or not all(is_int(i) for i in v):
        raise TypeError(f"{name} must be an int or a tuple of three ints (t, h, w), got {v!r}")
    if len(v) != 3:
        raise ValueError(f"{name} must be an int or a tuple of three ints (t, h, w), got {tuple(v)}")
    if min(v) < 1:
        raise ValueError(f"{name} must be positive, got {tuple(v)}")
    return (v[0], v[1], v[2])


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (any other strides are
    passed to the kernels), else a contiguous copy."""
    if t.dim() > 0 and t.stride(-1) != 1 and t.numel() > 0:
        return t.contiguous()
    return t


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last_3d`` when a 5-D ``x`` is stored channels-last (and not also
    plain contiguous, which happens for C == 1 or 1x1x1 volumes), else ``contiguous_format``."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
