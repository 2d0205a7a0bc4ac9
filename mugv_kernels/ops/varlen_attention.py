"""Packed variable-length attention (``cu_seqlens``) with interchangeable backends.

Self- and cross-attention over packed sequences: ``q [Tq, H, D]``, ``k/v [Tk, H, D]``,
segment ``b`` of the queries (rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``) attends to
segment ``b`` of the keys only. The math is :mod:`mugv_kernels.reference.varlen_attention`;
packing is :mod:`mugv_kernels.ops.packing`. MUG-V (arXiv 2510.17519) trains one clip per
micro-batch and runs its caption cross-attention through xformers' block-diagonal mask;
packing several clips and their captions into one stream removes the padding instead.

Backends, in the order ``backend="auto"`` tries them (the first usable one runs):

==============  =========================================================  ==========================
name            what runs                                                  where / limits
==============  =========================================================  ==========================
``"flash"``     flash-attn's ``flash_attn_varlen_func`` (optional          CUDA, fp16/bf16, D <= 256;
                dependency, imported if installed)                         fwd + bwd
``"native"``    PyTorch's ``torch.nn.attention.varlen.varlen_attn``        CUDA (sm80+), fp16/bf16,
                (its FlashAttention-2 kernels), where torch has it         D <= 256; fwd + bwd
``"flex"``      FlexAttention with a document mask built directly from     CUDA: fwd + bwd (compiled);
                ``cu_seqlens`` as a block-sparse ``BlockMask`` (no         CPU: forward only, and
                ``[Tq, Tk]`` mask is ever materialized)                    only under torch.compile
                                                                           for ``"auto"``
``"triton"``    our Triton FlashAttention-2 forward/backward (module       CUDA, fp16/bf16/fp32 (CPU
                ``varlen_attention_triton``), head_dim split 64 + 16       under TRITON_INTERPRET=1,
                for D = 72 instead of padding to 128                       never by "auto"); fwd + bwd
``"sdpa"``      ``F.scaled_dot_product_attention`` per segment (cuDNN /    any device and dtype;
                flash / efficient / math as PyTorch picks)                 fwd + bwd; reads
                                                                           ``cu_seqlens`` on the host
``"reference"`` the fp32 reference loop                                    any; fwd + bwd; host read
==============  =========================================================  ==========================

A backend without a backward (flex on CPU) is never chosen by ``"auto"`` when a gradient
is required. On CPU in eager mode ``"auto"`` skips flex (its unfused eager path
materializes the whole ``[H, Tq, Tk]`` score matrix) and runs ``"sdpa"``. ``"sdpa"`` and
``"reference"`` read the segment offsets on the host, so under ``torch.compile`` they
break the graph: ``"auto"`` prefers the others while compiling.

The Triton backend comes after flex in ``"auto"`` order until GPU measurements rank it
(its correctness is tested under the interpreter and its sm_90a build by the AOT check).

head_dim: any D works on every backend. flash and native need D a multiple of 8: other
D are zero-padded to the next multiple of 8 (one copy of q, k, v and a sliced output;
D = 72, MUG-V's, needs none). FlexAttention's Triton kernels round the tile width up to
a power of two internally (D = 72 computes on 128 lanes: ~44% of the dot-product work is
padding); on CUDA D < 16 is zero-padded to 16. Zero padding of q and k leaves every
score unchanged and padded v columns are dropped, so padding never changes the result.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mugv_kernels._registry import INTERPRET
from mugv_kernels._validate import FLOAT_DTYPES, check_tensor
from mugv_kernels.ops.packing import check_cu_seqlens
from mugv_kernels.ops.varlen_attention_triton import varlen_flash_attention
from mugv_kernels.reference.varlen_attention import varlen_attention_ref

try:  # optional dependency: not installable on our machines, used where present
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_varlen_func = None

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _native_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch version
    _native_varlen_attn = None

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch version
    BlockMask = flex_attention = None

__all__ = [
    "BACKENDS",
    "document_block_mask",
    "select_varlen_backend",
    "varlen_attention",
    "varlen_attention_backends",
]

BACKENDS: tuple[str, ...] = ("flash", "native", "flex", "triton", "sdpa", "reference")
"""Backend names in the order ``backend="auto"`` tries them."""

_HALF = (torch.float16, torch.bfloat16)
_FLEX_BLOCK = 128  # FlexAttention's default sparse block size (both axes)


# ----------------------------------------------------------------------------------------
# Availability: None when a backend can run, else the reason it cannot
# ----------------------------------------------------------------------------------------


def _why_not_fa2(what: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The limits flash-attn and PyTorch's varlen FlashAttention-2 share."""
    if device.type != "cuda":
        return f"{what} needs CUDA tensors"
    if dtype not in _HALF:
        return f"{what} needs float16/bfloat16, got {dtype}"
    if head_dim > 256:
        return f"{what} needs head_dim <= 256, got {head_dim}"
    return None


def _why_not(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, needs_grad: bool) -> str | None:
    if name == "flash":
        if _flash_attn_varlen_func is None:
            return "flash-attn is not installed (pip install flash-attn)"
        return _why_not_fa2("flash-attn", device, dtype, head_dim)
    if name == "native":
        if _native_varlen_attn is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        reason = _why_not_fa2("torch.nn.attention.varlen", device, dtype, head_dim)
        if reason is None and (
            not torch.backends.cuda.is_flash_attention_available() or torch.cuda.get_device_capability(device) < (8, 0)
        ):  # pragma: no cover - CUDA only
            return "torch.nn.attention.varlen needs PyTorch's flash kernels and an sm80+ GPU"
        return reason
    if name == "flex":
        if flex_attention is None:
            return f"torch {torch.__version__} has no FlexAttention"
        if device.type not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA and CPU, got {device.type}"
        if device.type == "cpu" and needs_grad:
            return "FlexAttention has no backward on CPU (inputs require grad)"
        return None
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and INTERPRET):
            return "the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
        return None
    if name in ("sdpa", "reference"):
        return None
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def varlen_attention_backends(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
    *,
    requires_grad: bool = False,
) -> dict[str, str | None]:
    """Which backends can run here: ``{name: None if usable else the reason}``.

    Args:
        device, dtype, head_dim: of the q/k/v that would be passed.
        requires_grad: whether a backward is needed (forward-only backends are unusable).

    Returns:
        A dict over :data:`BACKENDS`, in ``"auto"`` order.
    """
    device = torch.device(device)
    return {name: _why_not(name, device, dtype, head_dim, requires_grad) for name in BACKENDS}


def select_varlen_backend(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> str:
    """The backend :func:`varlen_attention` would run for these tensors.

    Raises:
        ValueError: an unknown name, or a forced backend that cannot run these inputs
            (the message says why).
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    D = q.shape[-1]
    if backend != "auto":
        reason = _why_not(backend, q.device, q.dtype, D, needs_grad)
        if reason is not None:
            raise ValueError(f"varlen_attention backend {backend!r} is not available: {reason}")
        return backend
    compiling = torch.compiler.is_compiling()
    for name in BACKENDS:
        if _why_not(name, q.device, q.dtype, D, needs_grad) is not None:
            continue
        if name == "flex" and q.device.type == "cpu" and not compiling:
            continue  # eager CPU flex materializes [H, Tq, Tk]; per-segment SDPA does not
        if name == "triton" and q.device.type != "cuda":
            continue  # the interpreter is for tests, not for running models
        return name
    raise AssertionError("unreachable: 'sdpa' always runs")  # pragma: no cover


# ----------------------------------------------------------------------------------------
# Backends. Each takes validated (q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q,
# offsets_k), the offsets being host lists when validation read them, else None.
# ----------------------------------------------------------------------------------------


def _pad_head_dim(t: Tensor, multiple: int, minimum: int = 0) -> Tensor:
    """Zero-pad the last axis to a multiple of ``multiple`` (at least ``minimum``)."""
    D = t.shape[-1]
    Dp = max(-(-D // multiple) * multiple, minimum)
    return t if Dp == D else F.pad(t, (0, Dp - D))


def _run_flash(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):  # pragma: no cover - CUDA + flash-attn
    D = q.shape[-1]
    qp, kp, vp = (_pad_head_dim(t, 8) for t in (q, k, v))
    out = _flash_attn_varlen_func(
        qp, kp, vp, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, dropout_p=0.0, softmax_scale=scale
    )
    return out[..., :D]


def _native_takes_scale() -> bool:
    """torch 2.10's ``varlen_attn`` has no ``scale`` (it always uses ``1 / sqrt(D)``);
    later versions take it as a keyword. Read once, at import."""
    try:
        return _native_varlen_attn is not None and "scale" in inspect.signature(_native_varlen_attn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a signature-less wrapper
        return False


_NATIVE_TAKES_SCALE = _native_takes_scale()


def _run_native(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):  # pragma: no cover - CUDA only
    D = q.shape[-1]
    qp, kp, vp = (_pad_head_dim(t, 8) for t in (q, k, v))
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if _NATIVE_TAKES_SCALE:
        out = _native_varlen_attn(qp, kp, vp, cu_q, cu_k, max_q, max_k, scale=scale)
    else:  # fold the scale into q: the kernel multiplies by 1 / sqrt(padded D)
        out = _native_varlen_attn(qp * (scale * math.sqrt(qp.shape[-1])), kp, vp, cu_q, cu_k, max_q, max_k)
    return out[..., :D]


def _document_ids(cu_seqlens: Tensor, total: int, padded: int, fill: int) -> Tensor:
    """Segment index of every position ``0 .. padded-1`` (``fill`` past ``total``).

    ``searchsorted(cu[1:], pos, right=True)`` counts the segment ends ``<= pos``: the index
    of the segment holding ``pos``, empty segments skipped. No host sync.
    """
    pos = torch.arange(padded, device=cu_seqlens.device, dtype=torch.int64)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    return torch.where(pos < total, ids, torch.full_like(ids, fill))


def document_block_mask(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int, total_k: int) -> BlockMask:
    """FlexAttention ``BlockMask`` of packed segments: query ``i`` sees key ``j`` iff both
    lie in the same segment ``b``.

    Built directly from the offsets, never materializing ``[Tq, Tk]``: per 128-row query
    block and 128-row key block it compares the ranges of segment ids they span. A block
    pair is *full* (no mask evaluated) when both blocks lie inside the same segment,
    *partial* when their ranges overlap, skipped otherwise. Pure tensor ops, no host sync,
    so it traces under ``torch.compile``.

    Args:
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32/int64 offsets (validated).
        total_q, total_k: Tq and Tk.

    Returns:
        A ``BlockMask`` for ``[1, H, Tq, D]`` queries against ``[1, H, Tk, D]`` keys.
    """
    bs = _FLEX_BLOCK
    nq, nk = -(-total_q // bs), -(-total_k // bs)
    doc_q = _document_ids(cu_seqlens_q, total_q, nq * bs, -1)  # padding rows never match
    doc_k = _document_ids(cu_seqlens_k, total_k, nk * bs, -2)
    big = torch.iinfo(torch.int64).max
    qb, kb = doc_q.view(nq, bs), doc_k.view(nk, bs)
    q_lo, q_hi = torch.where(qb >= 0, qb, big).amin(1), qb.amax(1)
    k_lo, k_hi = torch.where(kb >= 0, kb, big).amin(1), kb.amax(1)
    overlap = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])
    q_one = (q_lo == q_hi) & (qb >= 0).all(1)
    k_one = (k_lo == k_hi) & (kb >= 0).all(1)
    full = overlap & q_one[:, None] & k_one[None, :] & (q_lo[:, None] == k_lo[None, :])
    partial = overlap & ~full

    def as_indices(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    def same_segment(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    kv_num, kv_idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=same_segment, seq_lengths=(total_q, total_k)
    )


_compiled_flex: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """``flex_attention`` itself when already compiling or on CPU (eager, unfused), else a
    ``torch.compile``-d one (the fused Triton kernels)."""
    global _compiled_flex
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:  # pragma: no cover - CUDA only
        _compiled_flex = torch.compile(flex_attention)  # dynamic after a shape change: no recompile storm
    return _compiled_flex  # pragma: no cover - CUDA only


def _run_flex(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):
    D = q.shape[-1]
    if q.is_cuda:  # pragma: no cover - CUDA only
        q, k, v = (_pad_head_dim(t, 1, minimum=16) for t in (q, k, v))
    else:  # CPU: no gradient is needed here (checked), and flex refuses inputs that require one
        q, k, v = q.detach(), k.detach(), v.detach()
    mask = document_block_mask(cu_q, cu_k, q.shape[0], k.shape[0])
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D] views
    fn = _flex_fn(q.device)
    if torch.compiler.is_compiling():
        out = fn(qh, kh, vh, block_mask=mask, scale=scale)
    else:
        with warnings.catch_warnings():  # CPU eager: "flex_attention called without torch.compile"
            warnings.simplefilter("ignore", UserWarning)
            out = fn(qh, kh, vh, block_mask=mask, scale=scale)
    return out[0].transpose(0, 1)[..., :D]


def _host_offsets(cu: Tensor, offsets: Sequence[int] | None) -> Sequence[int]:
    return offsets if offsets is not None else cu.tolist()


def _run_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):
    bq, bk = _host_offsets(cu_q, offsets_q), _host_offsets(cu_k, offsets_k)
    pieces = []
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: zeros, kept in the graph so q gets a zero gradient
            pieces.append(q[q0:q1] * 0)
            continue
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [H, n, D]
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
    return torch.cat(pieces, dim=0)


def _run_triton(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):
    return varlen_flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def _run_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, offsets_q, offsets_k):
    return varlen_attention_ref(q, k, v, cu_q, cu_k, scale)


_RUN: dict[str, Callable[..., Tensor]] = {
    "flash": _run_flash,
    "native": _run_native,
    "flex": _run_flex,
    "triton": _run_triton,
    "sdpa": _run_sdpa,
    "reference": _run_reference,
}


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def _check_max_seqlen(name: str, value: object, offsets: Sequence[int] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise ValueError(
            f"{name} must be a Python int (a tensor would force a device-to-host sync), got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if offsets is not None:
        longest = max((offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1)), default=0)
        if value < longest:
            raise ValueError(f"{name} = {value} is smaller than the longest segment ({longest} tokens)")
    return value


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Attention within each packed segment: ``out[qb] = softmax(q[qb] k[kb]^T * scale) v[kb]``.

    Non-causal scaled dot-product attention (Vaswani et al. 2017, Sec. 3.2.1) over B
    segments packed along the token axis, the interface of flash-attn's
    ``flash_attn_varlen_func``. Self-attention passes the same offsets twice;
    cross-attention of each clip to its own caption passes the clips' and the captions'.

    Args:
        q: ``[Tq, H, D]`` fp32/bf16/fp16/fp64, last axis unit-stride preferred.
        k, v: ``[Tk, H, D]``, same dtype, device, H and D as ``q``.
        cu_seqlens_q: ``[B + 1]`` int32/int64 query offsets: 0, non-decreasing, ending at Tq.
        cu_seqlens_k: ``[B + 1]`` int32/int64 key offsets: 0, non-decreasing, ending at Tk.
            Segments may be empty: no queries -> no rows; no keys -> zero rows.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest query / key segment
            (flash, native and triton size their grids with them, so a value below the
            longest segment would drop rows: checked in eager mode, trusted under
            compile; never a tensor, so compiled code has no device-to-host sync).
        scale: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        backend: ``"auto"`` or one of ``"flash"``, ``"native"``, ``"flex"``, ``"triton"``,
            ``"sdpa"``, ``"reference"`` (see the module docstring for where each runs).
        validate: in eager mode, read both offset tensors on the host (one sync) and check
            their values and the max_seqlen bounds. Value checks are always skipped under
            ``torch.compile`` (they would need the values on the host); the structural
            checks (rank, dtype, device, segment counts, head dims) always run.

    Returns:
        ``[Tq, H, D]`` in ``q.dtype`` (may be a strided view).

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched float dtype among q, k, v;
            cu_seqlens not int32/int64.
        ValueError: wrong ranks; q/k/v head counts or head dims that differ; k and v of
            different lengths; cu_seqlens not 1-D, not starting at 0, not
            non-decreasing, not ending at the tensor length; q and k segment counts that
            differ; max_seqlen not an int or below the longest segment; an unknown
            backend or a forced backend that cannot run here (the message says why).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Tq, H, D = q.shape
    Tk = k.shape[0]
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"q, k, v must have the same number of heads, got {H}, {k.shape[1]}, {v.shape[1]}")
    if k.shape[2] != D or v.shape[2] != D:
        raise ValueError(f"q, k, v must have the same head dim, got {D}, {k.shape[2]}, {v.shape[2]}")
    if v.shape[0] != Tk:
        raise ValueError(f"k and v must have the same length, got {Tk} and {v.shape[0]}")
    if D == 0:
        raise ValueError("head dim must be >= 1, got 0")
    offsets_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq, device=q.device, check_values=validate)
    offsets_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, Tk, device=q.device, check_values=validate)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}"
        )
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, offsets_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, offsets_k)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    name = select_varlen_backend(q, k, v, backend)
    if Tq == 0 or Tk == 0:  # nothing to attend: zeros, every input still in the graph
        return q * 0 + (k.sum() + v.sum()) * 0
    return _RUN[name](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, offsets_q, offsets_k)
