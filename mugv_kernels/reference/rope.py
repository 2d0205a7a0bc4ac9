"""Reference math of the QK-RMSNorm + 3D RoPE family (differentiable PyTorch).

MUG-V (arXiv 2510.17519; public code ``mug_v/dit/module.py``: ``RMSNorm``,
``Attention.apply_rotary_emb``, ``precompute_freqs_cis_for_3drope``; ``mug_v/dit/model.py``:
``get_freq_cis``) normalizes every head of Q and K with an RMSNorm over ``head_dim`` and
then rotates it with a 3D rotary embedding (RoPE, Su et al., arXiv 2104.09864): the head
dimension is cut into three *sections*, section ``i`` is an ordinary 1D RoPE driven by
position column ``i`` (MUG-V: columns (h, w, t), 24 dims each of ``head_dim`` 72)::

    xn  = x * rsqrt(mean(x**2) + eps) * weight            # per head, fp32 statistics
    out[e]         = xn[e] * cos(a) - xn[partner(e)] * sin(a)   # e first of its pair
    out[partner(e)] = xn[partner(e)] * cos(a) + xn[e] * sin(a)
    a = pos[section(e)] * theta ** (-2 j / sections[section(e)])   # j: the pair index

Pairs are ``(2j, 2j+1)`` inside a section when ``interleaved`` (what ``view_as_complex``
gives: MUG-V, Lumina, Flux), else ``(j, j + d/2)`` (the rotate-half convention of
GPT-NeoX / HF Llama; diffusers' Wan and HunyuanVideo use the interleaved pairs). Dims
past ``sum(sections)`` pass through. ``across_heads``: the RMS runs over all heads of a
token (``H * D`` values, weight ``[H * D]``), Wan's ``rms_norm_across_heads``.

Written as ``out = xn * cos + xn[..., partner] * signed_sin`` over per-element tables
(:func:`rope_tables`), which is also how the Triton kernel computes it. ``rope3d_fwd_ref``
and ``rope3d_bwd_ref`` are the explicit forward/backward the ops run on plain CPU tensors
(and in float64, for ``gradcheck``), with the same signatures as the registered ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["qk_norm_rope3d_ref", "rope3d_bwd_ref", "rope3d_fwd_ref", "rope_tables", "video_positions_ref"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rope_tables(
    sections: Sequence[int], D: int, theta: float, interleaved: bool, *, dtype=torch.float32, device=None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-element description of the rotation of a head of ``D`` dims.

    Args:
        sections: three even ints, ``sum(sections) <= D``.
        D: head dimension.
        theta: RoPE base.
        interleaved: pair layout (see the module docstring).
        dtype: dtype of the float tables (fp32 as the kernel, or fp64).

    Returns:
        ``(partner, sign, inv_freq, column)``, each ``[D]``: the index of the element each
        element is paired with (itself for pass-through dims), the sign of its ``sin``
        term (-1 for the first element of a pair, +1 for the second, 0 for pass-through),
        the pair's frequency ``theta ** (-2j / d)`` (0 for pass-through) and the position
        column (section) driving it (0 for pass-through).
    """
    e = torch.arange(D, device=device)
    partner = e.clone()
    sign = torch.zeros(D, dtype=dtype, device=device)
    inv_freq = torch.zeros(D, dtype=dtype, device=device)
    column = torch.zeros(D, dtype=torch.long, device=device)
    neg_log2_theta = torch.tensor(-math.log2(theta), dtype=dtype)
    offset = 0
    for i, d in enumerate(sections):
        if d == 0:
            continue
        local = torch.arange(d, device=device)
        if interleaved:
            first = local % 2 == 0
            j = local // 2
            other = torch.where(first, local + 1, local - 1)
        else:
            first = local < d // 2
            j = torch.where(first, local, local - d // 2)
            other = torch.where(first, local + d // 2, local - d // 2)
        idx = slice(offset, offset + d)
        partner[idx] = offset + other
        sign[idx] = torch.where(first, -1.0, 1.0).to(dtype)
        # theta ** (-2j / d) as exp2(-(2j / d) * log2(theta)), rounded as the kernel does
        exponent = (2 * j).to(dtype) / torch.tensor(float(d), dtype=dtype)
        inv_freq[idx] = torch.exp2(exponent * neg_log2_theta.to(device))
        column[idx] = i
        offset += d
    return partner, sign, inv_freq, column


def _angles(positions: Tensor, column: Tensor, inv_freq: Tensor) -> Tensor:
    """``[..., D]`` rotation angle of every element for positions ``[..., 3]``."""
    pos = positions.to(inv_freq.dtype)
    return pos[..., column] * inv_freq


def _rms(x: Tensor, eps: float, across_heads: bool = False) -> Tensor:
    """``rsqrt(mean(x**2) + eps)`` over the last dim (over the last two, heads and
    head_dim, when ``across_heads``), keepdim."""
    dims = (-2, -1) if across_heads else -1
    return torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)


def _weight(weight: Tensor, x: Tensor, across_heads: bool, cd: torch.dtype) -> Tensor:
    """The norm weight shaped for ``x [..., H, D]``: ``[D]``, or ``[H * D]`` as ``[H, D]``."""
    w = weight.to(cd)
    return w.view(x.shape[-2], x.shape[-1]) if across_heads else w


def _rotate(xn: Tensor, positions: Tensor, sections, theta: float, interleaved: bool) -> Tensor:
    """Rotate ``xn [..., H, D]`` (compute dtype) by ``positions [..., 3]``."""
    D = xn.shape[-1]
    partner, sign, inv_freq, column = rope_tables(sections, D, theta, interleaved, dtype=xn.dtype, device=xn.device)
    a = _angles(positions, column, inv_freq)[..., None, :]  # [..., 1, D]
    return xn * torch.cos(a) + xn[..., partner] * (sign * torch.sin(a))


def qk_norm_rope3d_ref(
    x: Tensor,
    positions: Tensor,
    sections: Sequence[int],
    weight: Tensor | None = None,
    eps: float = 1e-6,
    theta: float = 10000.0,
    interleaved: bool = True,
    across_heads: bool = False,
) -> Tensor:
    """Differentiable reference for one tensor: optional RMSNorm over D (over all heads,
    ``H * D`` values, with ``across_heads``: Wan's ``rms_norm_across_heads``), then 3D RoPE.

    Args:
        x: ``[B, N, H, D]`` or ``[total, H, D]``, any float dtype.
        positions: ``[B, N, 3]`` / ``[N, 3]`` (shared by every sample) or ``[total, 3]``,
            integer.
        sections: three even ints summing to at most D.
        weight: ``[D]`` RMSNorm weight (``[H * D]`` with ``across_heads``), or None (no norm).
        eps, theta, interleaved, across_heads: as :func:`mugv_kernels.qk_norm_rope3d`.

    Returns:
        Same shape as ``x``, in ``x.dtype`` (computed in fp32, fp64 for fp64 input).
    """
    cd = _compute_dtype(x)
    xn = x.to(cd)
    if weight is not None:
        xn = xn * _rms(xn, eps, across_heads) * _weight(weight, xn, across_heads, cd)
    if x.dim() == 4 and positions.dim() == 2:
        positions = positions.unsqueeze(0)
    return _rotate(xn, positions, sections, theta, interleaved).to(x.dtype)


def rope3d_fwd_ref(q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False):
    """Explicit forward with the outputs of ``mugv::qk_norm_rope3d_fwd``: ``(q_out, k_out)``,
    contiguous (``k_out`` empty when ``k`` is None)."""
    args = (eps, theta, interleaved, across_heads)
    q_out = qk_norm_rope3d_ref(q, positions, sections, q_weight, *args).contiguous()
    if k is None:
        return q_out, q.new_empty(0)
    return q_out, qk_norm_rope3d_ref(k, positions, sections, k_weight, *args).contiguous()


def _bwd_one(dy: Tensor, x: Tensor, positions: Tensor, weight, sections, eps, theta, interleaved, across_heads):
    """``(dx, dweight)`` of one tensor; ``dy`` may be None (no gradient: zeros)."""
    cd = _compute_dtype(x)
    if dy is None:
        dx = torch.zeros_like(x)
        return dx, (torch.zeros_like(weight) if weight is not None else x.new_empty(0))
    D = x.shape[-1]
    if x.dim() == 4 and positions.dim() == 2:
        positions = positions.unsqueeze(0)
    partner, sign, inv_freq, column = rope_tables(sections, D, theta, interleaved, dtype=cd, device=x.device)
    a = _angles(positions, column, inv_freq)[..., None, :]
    dy = dy.to(cd)
    # inverse rotation: the pair (e, partner) turned by -a
    dxn = dy * torch.cos(a) - dy[..., partner] * (sign * torch.sin(a))
    if weight is None:
        return dxn.to(x.dtype).contiguous(), x.new_empty(0)
    xf = x.to(cd)
    rstd = _rms(xf, eps, across_heads)
    xhat = xf * rstd
    dweight = (dxn * xhat).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
    dxhat = dxn * _weight(weight, xf, across_heads, cd)
    dims = (-2, -1) if across_heads else -1
    dx = (dxhat - xhat * (dxhat * xhat).mean(dims, keepdim=True)) * rstd
    return dx.to(x.dtype).contiguous(), dweight


def rope3d_bwd_ref(
    dq_out, dk_out, q, k, positions, q_weight, k_weight, sections, eps, theta, interleaved, across_heads=False
):
    """Explicit backward matching ``mugv::qk_norm_rope3d_bwd``: ``(dq, dk, dq_weight,
    dk_weight)``; the gradient of an absent input is an empty tensor."""
    args = (sections, eps, theta, interleaved, across_heads)
    dq, dqw = _bwd_one(dq_out, q, positions, q_weight, *args)
    if k is None:
        return dq, q.new_empty(0), dqw, q.new_empty(0)
    dk, dkw = _bwd_one(dk_out, k, positions, k_weight, *args)
    return dq, dk, dqw, dkw


def video_positions_ref(T: int, H: int, W: int) -> Tensor:
    """MUG-V token positions ``[T*H*W + 2, 3]`` in columns (h, w, t), written as the
    public ``MUGDiT.get_freq_cis`` lays out its table: a ``(T+2, H, W)`` grid of frame
    indices ``0..T+1``, of which the inner frames are the video, grid point ``(0, 0, 0)``
    the start token and ``(T+1, H-1, W-1)`` the end token."""
    t, h, w = torch.meshgrid(torch.arange(T + 2), torch.arange(H), torch.arange(W), indexing="ij")
    grid = torch.stack([h, w, t], -1)  # [T+2, H, W, 3]
    return torch.cat([grid[0, 0, 0][None], grid[1:-1].reshape(-1, 3), grid[-1, -1, -1][None]])
