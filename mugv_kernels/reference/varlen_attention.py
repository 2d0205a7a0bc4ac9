"""Reference math of packed variable-length attention (differentiable PyTorch, fp32).

Packed ("THD") layout, as flash-attn's ``flash_attn_varlen_func`` and PyTorch's
``torch.nn.attention.varlen.varlen_attn``: B sequences are concatenated along the token
axis, ``q [Tq, H, D]``, ``k/v [Tk, H, D]``, and ``cu_seqlens_q``/``cu_seqlens_k``
(``[B + 1]``, starting at 0, non-decreasing, ending at ``Tq``/``Tk``) delimit segment ``b``
as rows ``cu[b]:cu[b + 1]``. Query segment ``b`` attends to key segment ``b`` only::

    out[qb] = softmax(q[qb] @ k[kb]^T * scale) @ v[kb]      (scaled dot-product attention,
                                                             Vaswani et al. 2017, Sec. 3.2.1)

A segment with no keys yields zeros (the convention of flash-attn and FlexAttention for
fully masked rows); a segment with no queries contributes no rows.

:func:`varlen_attention_ref` is the definition the tests and benchmarks share and the
``"reference"`` backend of :func:`mugv_kernels.varlen_attention`. It reads the segment
boundaries on the host (one device-to-host copy) and loops over segments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_ref", "varlen_attention_bwd_ref", "varlen_attention_fwd_ref", "varlen_attention_ref"]


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Attention of one segment, explicit softmax in fp32 (fp64 stays fp64).

    Args:
        q: ``[Nq, H, D]``; k, v: ``[Nk, H, D]`` (any float dtype).
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.

    Returns:
        ``[Nq, H, D]`` in fp32, or fp64 for fp64 inputs (zeros when ``Nk == 0``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if k.shape[0] == 0:
        return qf * 0.0  # no keys: zeros (kept in the graph so q gets a zero gradient)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf)


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Packed variable-length attention, one segment at a time (fp32 math).

    Args:
        q: ``[Tq, H, D]``; k, v: ``[Tk, H, D]``; any float dtype, any strides.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32/int64 segment offsets (unchecked:
            :func:`mugv_kernels.varlen_attention` validates them).
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``[Tq, H, D]`` in ``q.dtype``; rows of segments without keys are zero.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bq = cu_seqlens_q.tolist()
    bk = cu_seqlens_k.tolist()
    pieces = []
    for b in range(len(bq) - 1):
        if bq[b + 1] > bq[b]:
            pieces.append(attention_ref(q[bq[b] : bq[b + 1]], k[bk[b] : bk[b + 1]], v[bk[b] : bk[b + 1]], scale))
    if not pieces:
        return (q * 0.0).to(q.dtype)
    return torch.cat(pieces, dim=0).to(q.dtype)


def varlen_attention_fwd_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`varlen_attention_ref` plus the softmax log-sum-exp the kernels save.

    Returns:
        ``(out [Tq, H, D] in q.dtype, lse [H, Tq] fp32)`` with
        ``lse[h, i] = log(sum_j exp(scale * q_i . k_j))`` over the keys of ``i``'s segment
        (natural log; ``+inf`` for rows of segments without keys).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=torch.float32, device=q.device)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bq) - 1):
        if bq[b + 1] > bq[b] and bk[b + 1] > bk[b]:
            qs, ks = q[bq[b] : bq[b + 1]].to(acc), k[bk[b] : bk[b + 1]].to(acc)
            scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
            lse[:, bq[b] : bq[b + 1]] = torch.logsumexp(scores, dim=-1).float()
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale), lse


def varlen_attention_bwd_ref(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`varlen_attention_ref` for upstream ``dout``
    ``[Tq, H, D]``, written out (no autograd, so it also runs inside custom ops), per
    segment in fp32 (fp64 stays fp64)::

        p = softmax(scale * q k^T);  dv = p^T dout;  dp = dout v^T
        ds = p * (dp - rowsum(dp * p));  dq = scale * ds k;  dk = scale * ds^T q

    (FlashAttention-2, arXiv 2307.08691, Sec. 2.2.) Each gradient is in its input's dtype;
    keys of segments without queries and queries of segments without keys get zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bq) - 1):
        sq, sk = slice(bq[b], bq[b + 1]), slice(bk[b], bk[b + 1])
        if bq[b + 1] == bq[b] or bk[b + 1] == bk[b]:
            continue
        qs, ks, vs, dos = q[sq].to(acc), k[sk].to(acc), v[sk].to(acc), dout[sq].to(acc)
        p = torch.softmax(torch.einsum("qhd,khd->hqk", qs, ks) * scale, dim=-1)
        dv[sk] = torch.einsum("hqk,qhd->khd", p, dos)
        dp = torch.einsum("qhd,khd->hqk", dos, vs)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[sq] = torch.einsum("hqk,khd->qhd", ds, ks) * scale
        dk[sk] = torch.einsum("hqk,qhd->khd", ds, qs) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
