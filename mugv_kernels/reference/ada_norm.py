"""Reference math of the adaLN family (differentiable PyTorch, fp32 statistics).

The chain of one MUG-V sub-layer (MUG-V paper arXiv 2510.17519, Sec. 3; public code
``mug_v/dit/model.py``, ``t2i_modulate`` and the gated residuals of ``MUGDiTBlock``)::

    r   = residual + gate * y                      # gated residual (gate=None: plain)
    n   = norm(r) * weight + bias                  # LayerNorm or RMSNorm, fp32 statistics
    out = n * (1 + scale) + shift                  # adaLN modulation

``shift/scale/gate`` are ``[B, C]`` (one set per sample) or ``[B, G, C]`` with an
``index [B, N]`` choosing the set of each token (image-to-video: G=2).

``ada_norm_chain`` is the autograd-differentiable definition; ``adaln_fwd_ref`` and
``adaln_bwd_ref`` are the explicit forward/backward the ops run on plain CPU tensors,
with the same signature as the kernels' ops.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(t: Tensor) -> Tensor:
    """Compute dtype: fp32 for fp32/bf16/fp16 inputs, fp64 stays fp64 (for gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def select_modulation(m: Tensor | None, index: Tensor | None, n_tokens: int) -> Tensor | None:
    """Per-token view of a modulation tensor, in fp32.

    Args:
        m: ``[B, C]`` or ``[B, G, C]``, or None.
        index: ``[B, N]`` integer rows into ``G`` (required when ``m`` is 3-D with G > 1).
        n_tokens: N.

    Returns:
        ``[B, N, C]`` (or ``[B, 1, C]`` broadcastable) fp32 tensor, or None.
    """
    if m is None:
        return None
    m = _acc(m)
    if m.dim() == 2:
        return m[:, None, :]
    if index is None:
        return m[:, :1, :].expand(-1, n_tokens, -1)
    b = torch.arange(m.shape[0], device=m.device)[:, None]
    return m[b, index.long()]


def _normalize(r: Tensor, eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``(xhat, mean, rstd)`` of ``r`` over its last dimension."""
    r = _acc(r)
    if rms:
        mean = torch.zeros(r.shape[:-1], dtype=r.dtype, device=r.device)
        var = r.square().mean(-1)
        xhat_c = r
    else:
        mean = r.mean(-1)
        xhat_c = r - mean[..., None]
        var = xhat_c.square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    return xhat_c * rstd[..., None], mean, rstd


def ada_norm_chain(
    x: Tensor,
    residual: Tensor | None = None,
    gate: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    index: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    rms: bool = False,
    do_norm: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Differentiable reference of the whole family.

    Args:
        x: ``[B, N, C]``: the branch output ``y`` when ``residual`` is given, else the
            norm input.
        residual: ``[B, N, C]`` or None (then ``r = x``).
        gate, shift, scale: ``[B, C]`` / ``[B, G, C]`` or None.
        index: ``[B, N]`` int rows into G, or None.
        weight, bias: ``[C]`` affine of the norm, or None.
        eps: added to the variance.
        rms: RMSNorm instead of LayerNorm.
        do_norm: False computes only the gated residual.

    Returns:
        ``(r, out)``: ``r`` in ``residual.dtype`` (None without residual), ``out`` in the
        norm input's dtype (None when ``do_norm`` is False).
    """
    n_tok = x.shape[1]
    if residual is not None:
        g = select_modulation(gate, index, n_tok)
        branch = _acc(x) if g is None else _acc(x) * g
        r = (_acc(residual) + branch).to(residual.dtype)
    else:
        r = x
    if not do_norm:
        return r if residual is not None else None, None
    xhat, _, _ = _normalize(r, eps, rms)
    n = xhat
    if weight is not None:
        n = n * _acc(weight)
    if bias is not None:
        n = n + _acc(bias)
    sc = select_modulation(scale, index, n_tok)
    sh = select_modulation(shift, index, n_tok)
    if sc is not None:
        n = n * (1 + sc)
    if sh is not None:
        n = n + sh
    return (r if residual is not None else None), n.to(r.dtype)


def adaln_fwd_ref(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm):
    """Explicit forward with the outputs of ``mugv::adaln_fwd``: ``(r, out, mean, rstd)``.

    ``r`` is empty without a residual, ``out`` empty without the norm; ``mean``/``rstd``
    are fp32 ``[B, N]`` (mean is 0 for RMSNorm).
    """
    B, N, _ = x.shape
    r, out = ada_norm_chain(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm)
    norm_in = r if residual is not None else x
    if do_norm:
        _, mean, rstd = _normalize(norm_in, eps, rms)
    else:
        mean = torch.empty(0, dtype=torch.float32, device=x.device)
        rstd = torch.empty(0, dtype=torch.float32, device=x.device)
    empty = x.new_empty(0)
    return (r if r is not None else empty), (out if out is not None else empty), mean, rstd


def _reduce_mod(per_token: Tensor, m: Tensor, index: Tensor | None) -> Tensor:
    """Sum ``per_token [B, N, C]`` over the tokens that selected each row of ``m``."""
    if m.dim() == 2:
        return per_token.sum(1).to(m.dtype)
    B, G, C = m.shape
    out = torch.zeros(B, G, C, dtype=per_token.dtype, device=per_token.device)
    idx = (
        torch.zeros(per_token.shape[:2], dtype=torch.long, device=per_token.device)
        if index is None
        else index.long()
    )
    out.scatter_add_(1, idx[..., None].expand(-1, -1, C), per_token)
    return out.to(m.dtype)


def adaln_bwd_ref(dr, dout, x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd, eps, rms, do_norm):
    """Explicit backward matching ``mugv::adaln_bwd``.

    Returns ``(dx, dresidual, dgate, dshift, dscale, dweight, dbias)``; the gradient of
    an absent input is an empty tensor.
    """
    B, N, C = x.shape
    has_res = residual is not None
    norm_in = _acc(r if has_res else x)
    dr_total = torch.zeros(B, N, C, dtype=norm_in.dtype, device=x.device)
    def empty() -> Tensor:  # a fresh one each time: op outputs may not alias
        return x.new_empty(0)

    dshift, dscale, dweight, dbias = empty(), empty(), empty(), empty()
    if do_norm and dout is not None and dout.numel() > 0:
        dout = _acc(dout)
        if rms:
            xhat = norm_in * rstd[..., None]
        else:
            xhat = (norm_in - mean[..., None]) * rstd[..., None]
        n = xhat
        if weight is not None:
            n = n * _acc(weight)
        if bias is not None:
            n = n + _acc(bias)
        if shift is not None:
            dshift = _reduce_mod(dout, shift, index)
        dn = dout
        if scale is not None:
            dscale = _reduce_mod(dout * n, scale, index)
            dn = dout * (1 + select_modulation(scale, index, N))
        if bias is not None:
            dbias = dn.sum((0, 1)).to(bias.dtype)
        dxhat = dn
        if weight is not None:
            dweight = (dn * xhat).sum((0, 1)).to(weight.dtype)
            dxhat = dn * _acc(weight)
        c1 = (dxhat * xhat).mean(-1, keepdim=True)
        if rms:
            dr_total = (dxhat - xhat * c1) * rstd[..., None]
        else:
            c2 = dxhat.mean(-1, keepdim=True)
            dr_total = (dxhat - xhat * c1 - c2) * rstd[..., None]
    elif do_norm:  # no gradient reaches the norm output: its parameters get zeros
        dshift, dscale, dweight, dbias = (
            torch.zeros_like(t) if t is not None else empty() for t in (shift, scale, weight, bias)
        )
    if has_res and dr is not None and dr.numel() > 0:
        dr_total = dr_total + _acc(dr)
    dgate = empty()
    if has_res:
        dresidual = dr_total.to(residual.dtype)
        if gate is not None:
            dx = (dr_total * select_modulation(gate, index, N)).to(x.dtype)
            dgate = _reduce_mod(dr_total * _acc(x), gate, index)
        else:  # dx equals dresidual: a separate tensor (op outputs may not alias)
            dx = dr_total.to(x.dtype, copy=True)
    else:
        dresidual = empty()
        dx = dr_total.to(x.dtype)
    return dx, dresidual, dgate, dshift, dscale, dweight, dbias
