"""Packing variable-length sequences into one token stream with ``cu_seqlens``.

B sequences ``[N_b, ...]`` are concatenated along their first axis into ``[sum N_b, ...]``
("THD" when the trailing axes are heads and head_dim); ``cu_seqlens`` (``[B + 1]``, the
cumulative lengths starting at 0) delimits sequence ``b`` as rows
``cu_seqlens[b]:cu_seqlens[b + 1]`` and ``max_seqlen`` is the longest ``N_b``. This is the
convention of flash-attn's varlen API and of ``torch.nn.attention.varlen``; it removes all
padding from a batch of clips of different resolution and length (MUG-V, arXiv
2510.17519: the public training code runs one clip per micro-batch instead).

:func:`check_cu_seqlens` is the validation every varlen op in the package shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mugv_kernels._validate import INDEX_DTYPES, check_tensor

__all__ = ["check_cu_seqlens", "pack", "seqlens_from_cu", "unpack"]

_INT32_MAX = 2**31 - 1


def check_cu_seqlens(
    name: str,
    cu_seqlens: object,
    total: int,
    *,
    device: torch.device | None = None,
    check_values: bool = True,
) -> list[int] | None:
    """Validate a ``cu_seqlens`` tensor against a packed length ``total``.

    Structure (always): a 1-D int32/int64 tensor with at least one entry, on ``device``.
    Values (eager mode only; skipped under ``torch.compile``, where they would need a
    device-to-host sync, and when ``check_values`` is False): ``cu_seqlens[0] == 0``,
    non-decreasing, ``cu_seqlens[-1] == total``.

    Args:
        name: the argument's name, for messages.
        cu_seqlens: the tensor to check.
        total: the packed length it must end at.
        device: the device it must be on (None: any).
        check_values: read the values on the host and check them (one sync).

    Returns:
        The offsets as a Python list when they were read, else None.

    Raises:
        TypeError: not a tensor, or a dtype other than int32/int64.
        ValueError: wrong rank, wrong device, or bad values.
    """
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if not check_values or torch.compiler.is_compiling():
        return None
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {offsets[0]}")
    for b in range(len(offsets) - 1):
        if offsets[b + 1] < offsets[b]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{b}] = {offsets[b]} > {name}[{b + 1}] = {offsets[b + 1]}"
            )
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {name}[-1] = {offsets[-1]}")
    return offsets


def seqlens_from_cu(offsets: Sequence[int]) -> list[int]:
    """Segment lengths ``[N_0, ..., N_{B-1}]`` from host offsets ``[0, ..., T]``."""
    return [offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1)]


def pack(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Concatenate variable-length sequences into one packed tensor.

    Args:
        tensors: a non-empty list of ``[N_b, ...]`` tensors with the same trailing shape,
            dtype and device; ``N_b = 0`` is allowed. Any strides.

    Returns:
        ``(packed, cu_seqlens, max_seqlen)``: ``packed [sum N_b, ...]`` (a new contiguous
        tensor, differentiable), ``cu_seqlens [B + 1]`` int32 on the tensors' device
        (int64 when the total exceeds 2^31 - 1), and ``max_seqlen = max N_b`` as a Python
        int. Lengths come from the shapes: no device-to-host sync.

    Raises:
        TypeError: a non-tensor in the list, or dtypes that differ.
        ValueError: an empty list (or not a list), a 0-d tensor, or mismatched trailing
            shapes or devices.
    """
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise ValueError("tensors must be a non-empty list of [N_i, ...] tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"tensors[{i}] must have a sequence axis ([N_i, ...]), got a 0-d tensor")
        if t.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"tensors[{i}] has trailing shape {tuple(t.shape[1:])}, expected {tuple(first.shape[1:])} "
                "(all sequences must share every axis but the first)"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}, expected {first.dtype} (as tensors[0])")
        if t.device != first.device:
            raise ValueError(f"tensors[{i}] is on {t.device}, expected {first.device} (as tensors[0])")
    lengths = [int(t.shape[0]) for t in tensors]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    idx_dtype = torch.int32 if offsets[-1] <= _INT32_MAX else torch.int64
    cu_seqlens = torch.tensor(offsets, dtype=idx_dtype, device=first.device)
    return torch.cat(list(tensors), dim=0), cu_seqlens, max(lengths)


def unpack(packed: Tensor, cu_seqlens: Tensor) -> list[Tensor]:
    """Split a packed tensor back into its sequences (inverse of :func:`pack`).

    Args:
        packed: ``[T, ...]``.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets on ``packed``'s device (read on the
            host: one sync).

    Returns:
        B tensors ``[N_b, ...]``: views of ``packed`` (differentiable).

    Raises:
        TypeError: ``cu_seqlens`` not an int32/int64 tensor.
        ValueError: ``packed`` is not a tensor of rank >= 1, or ``cu_seqlens`` is invalid
            (see :func:`check_cu_seqlens`).
    """
    if not isinstance(packed, Tensor) or packed.dim() == 0:
        raise ValueError("packed must be a [T, ...] tensor")
    offsets = check_cu_seqlens("cu_seqlens", cu_seqlens, packed.shape[0], device=packed.device)
    if offsets is None:  # compiling: the split sizes need the values anyway
        offsets = cu_seqlens.tolist()
    return list(torch.split(packed, seqlens_from_cu(offsets), dim=0))
