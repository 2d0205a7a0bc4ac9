"""Reference math of GroupNorm + SiLU (the video VAE's normalization + activation).

GroupNorm (Wu & He, arXiv 1803.08494 Sec. 3) followed by SiLU (Elfwing et al., arXiv
1702.03118), the VAE's ``nn.GroupNorm`` + ``nn.SiLU`` pair: per sample and group of
``C // G`` channels, statistics over the group's channels and all positions, in fp32::

    xhat = (x - mean[b, g]) * rstd[b, g]        rstd = 1 / sqrt(var + eps)
    y    = silu(xhat * weight[c] + bias[c])

These functions are the definition of "correct" for the tests and benchmarks and the
path :func:`mugv_kernels.group_norm_silu` runs on plain CPU tensors and in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mugv_kernels._validate import memory_format_of

__all__ = ["group_norm_silu_bwd_ref", "group_norm_silu_ref", "group_norm_stats_ref"]


def group_norm_silu_ref(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-6,
    silu: bool = True,
) -> Tensor:
    """``silu(group_norm(x))`` with fp32 statistics (``F.group_norm`` + ``F.silu`` on an
    fp32 copy; fp64 for fp64 x), returned in ``x.dtype`` and ``x``'s memory format.

    Args:
        x: ``[B, C, *spatial]``; weight, bias: ``[C]`` or None; num_groups divides C.
    """
    fmt = memory_format_of(x)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    xc = x.to(ct)
    if x.shape[0] == 1 and x[0].numel() == num_groups:
        # one value per group: F.group_norm refuses a single sample of it ("more than 1 value per
        # channel"), though the statistics are defined (var 0); two copies normalize the same.
        y = F.group_norm(torch.cat([xc, xc]), num_groups, w, b, eps)[:1]
    else:
        y = F.group_norm(xc, num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=fmt)


def group_norm_stats_ref(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """fp32 ``(mean, rstd)``, each ``[B, num_groups]``."""
    B = x.shape[0]
    xg = x.float().reshape(B, num_groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)  # fp32 even for fp64 x: the op's declared dtype


def group_norm_silu_bwd_ref(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`group_norm_silu_ref`, explicit (no autograd):
    ``dz = dy * s * (1 + z * (1 - s))`` with ``s = sigmoid(z)``; ``dweight = sum dz * xhat``;
    ``dbias = sum dz``; ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``
    per group, ``dxhat = dz * weight``. fp32 math (fp64 for fp64 inputs)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C = x.shape[:2]
    G = num_groups
    xg = x.to(ct).reshape(B, G, -1)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = ((xg - mean) * rstd).reshape(B, C, -1)
    w = weight.to(ct)[None, :, None] if weight is not None else torch.ones((), dtype=ct, device=x.device)
    b = bias.to(ct)[None, :, None] if bias is not None else torch.zeros((), dtype=ct, device=x.device)
    dz = dy.to(ct).reshape(B, C, -1)
    if silu:
        z = xhat * w + b
        s = torch.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    dw = (dz * xhat).sum((0, 2)).to(weight.dtype) if weight is not None else None
    db = dz.sum((0, 2)).to(bias.dtype) if bias is not None else None
    dxhat = (dz * w).reshape(B, G, -1)
    xh = xhat.reshape(B, G, -1)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xh * (dxhat * xh).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dw, db
