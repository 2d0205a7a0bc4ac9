"""adaLN family: gated residual + LayerNorm/RMSNorm + adaLN modulation, fused.

One MUG-V sub-layer boundary (paper arXiv 2510.17519 Sec. 3; public code
``mug_v/dit/model.py``: ``t2i_modulate`` and the gated residuals of the DiT block) is::

    r   = residual + gate[b, index[b, n]] * y
    out = (norm(r) * weight + bias) * (1 + scale[b, index[b, n]]) + shift[b, index[b, n]]

The public code runs this as ~10 PyTorch kernels, normalizes twice for image-to-video
(once per modulation set, then ``torch.where``) and materializes per-token modulation.
Here one kernel reads each row once, normalizes once whatever the number of modulation
sets G, and selects the set per token from ``index``; the backward reduces
dgate/dshift/dscale per selected row in fp32 without materializing any per-token tensor.

Layout (top to bottom): Triton kernels, launch helpers, the registered ops
``mugv::adaln_fwd`` / ``mugv::adaln_bwd`` with their autograd, the public functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mugv_kernels._registry import KERNEL_BACKENDS, check_backend, launch, mugv_op, register_aot_cases, use_triton
from mugv_kernels._validate import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, last_dim_contiguous
from mugv_kernels.reference.ada_norm import ada_norm_chain, adaln_bwd_ref, adaln_fwd_ref

__all__ = ["BACKENDS", "MAX_C", "ada_layer_norm", "gated_residual", "gated_residual_ada_layer_norm"]

BACKENDS = KERNEL_BACKENDS  # the backend= values of the family

MAX_C = 65536
"""Largest hidden size a row-per-program kernel handles (one row lives in registers)."""


# ----------------------------------------------------------------------------------------
# Kernels
#
# Forward, one program per token row (int64 row offsets):
#   r    = residual + gate * x                                   (HAS_RES; stored, rounded)
#   xhat = (r - mean) * rstd   (LayerNorm)  |  r * rstd  (RMSNorm),  fp32 statistics
#   out  = (xhat * w + b) * (1 + scale) + shift
# Backward, one program per (sample b, chunk of rows); with n = xhat * w + b:
#   dshift[g] += dout          dscale[g] += dout * n          dn = dout * (1 + scale)
#   db += dn    dw += dn * xhat    dxhat = dn * w
#   dr = rstd * (dxhat - xhat * mean(dxhat * xhat) - mean(dxhat))   (RMSNorm: no last term)
#   dr += upstream grad of r;  dresidual = dr;  dy = dr * gate;  dgate[g] += dr * y
# Per-row parameter grads accumulate in fp32 registers; the per-g sums are flushed into a
# [B, chunks, G, C] fp32 buffer whenever the row's g changes (read-modify-write, one
# writer per slot: deterministic), then summed over chunks on the host.
# ----------------------------------------------------------------------------------------


@triton.jit
def _adaln_fwd_kernel(
    X, RES, GATE, SHIFT, SCALE, INDEX, W, BIAS,
    R_OUT, OUT, MEAN, RSTD,
    N, C,
    stride_xb, stride_xn, stride_rb, stride_rn,
    stride_gb, stride_gg, stride_shb, stride_shg, stride_scb, stride_scg,
    stride_ib, stride_in,
    eps,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, IS_RMS: tl.constexpr, DO_NORM: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row - b * N
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if HAS_INDEX:
        g = tl.load(INDEX + b * stride_ib + n * stride_in).to(tl.int64)
    else:
        g = 0
    x = tl.load(X + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(RES + b * stride_rb + n * stride_rn + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + b * stride_gb + g * stride_gg + cols, mask=mask, other=0.0).to(tl.float32)
            x = res + gate * x
        else:
            x = res + x
        r_out = x.to(R_OUT.dtype.element_ty)
        tl.store(R_OUT + row * C + cols, r_out, mask=mask)
        x = r_out.to(tl.float32)  # normalize exactly the residual stream that was stored
    if DO_NORM:
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / C
            xc = tl.where(mask, x - mean, 0.0)
            tl.store(MEAN + row, mean)
        var = tl.sum(xc * xc, axis=0) / C
        rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)  # eps may arrive as fp64 from Inductor
        tl.store(RSTD + row, rstd)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            scale = tl.load(SCALE + b * stride_scb + g * stride_scg + cols, mask=mask, other=0.0)
            y = y * (1.0 + scale.to(tl.float32))
        if HAS_SHIFT:
            shift = tl.load(SHIFT + b * stride_shb + g * stride_shg + cols, mask=mask, other=0.0)
            y = y + shift.to(tl.float32)
        tl.store(OUT + row * C + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_into(P, offset, acc, cols, mask):
    """``P[offset + cols] += acc`` (the slot has a single writer)."""
    ptrs = P + offset + cols
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DOUT, DR, X, R, GATE, SCALE, INDEX, W, BIAS, MEAN, RSTD,
    DX, DRES, DGATE_P, DSHIFT_P, DSCALE_P, DW_P, DB_P,
    N, C, G, n_chunks, rows_per_chunk,
    stride_xb, stride_xn, stride_rb, stride_rn,
    stride_dob, stride_don, stride_doc, stride_drb, stride_drn, stride_drc,
    stride_gb, stride_gg, stride_scb, stride_scg, stride_ib, stride_in,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, IS_RMS: tl.constexpr, HAS_DOUT: tl.constexpr,
    HAS_DR: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    n_start = chunk * rows_per_chunk
    n_end = tl.minimum(n_start + rows_per_chunk, N)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    slot = (b * n_chunks + chunk) * G  # first [G, C] slot of this program
    if HAS_INDEX:
        cur_g = tl.load(INDEX + b * stride_ib + n_start * stride_in).to(tl.int64)
    else:
        cur_g = 0
    for n in range(n_start, n_end):
        row = b * N + n
        if HAS_INDEX:
            g = tl.load(INDEX + b * stride_ib + n * stride_in).to(tl.int64)
            if g != cur_g:  # the token switches modulation set: flush the per-g sums
                if HAS_GATE:
                    _accumulate_into(DGATE_P, (slot + cur_g) * C, acc_gate, cols, mask)
                if HAS_SHIFT:
                    _accumulate_into(DSHIFT_P, (slot + cur_g) * C, acc_shift, cols, mask)
                if HAS_SCALE:
                    _accumulate_into(DSCALE_P, (slot + cur_g) * C, acc_scale, cols, mask)
                acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
                acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
                acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
                cur_g = g
        else:
            g = 0
        dr = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_DOUT:
            r = tl.load(R + b * stride_rb + n * stride_rn + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                xhat = r * rstd
            else:
                xhat = tl.where(mask, (r - tl.load(MEAN + row)) * rstd, 0.0)
            # upstream grads keep their strides (e.g. expanded ones from a .sum(): stride 0)
            dout = tl.load(DOUT + b * stride_dob + n * stride_don + cols * stride_doc, mask=mask, other=0.0)
            dout = dout.to(tl.float32)
            if HAS_SHIFT:
                acc_shift += dout
            dn = dout
            if HAS_SCALE:
                nrm = xhat
                if HAS_W:
                    nrm = nrm * w
                if HAS_B:
                    nrm = nrm + bias
                acc_scale += dout * nrm
                scale = tl.load(SCALE + b * stride_scb + g * stride_scg + cols, mask=mask, other=0.0)
                dn = dout * (1.0 + scale.to(tl.float32))
            if HAS_B:
                acc_b += dn
            if HAS_W:
                acc_w += dn * xhat
                dxhat = dn * w
            else:
                dxhat = dn
            c1 = tl.sum(dxhat * xhat, axis=0) / C
            if IS_RMS:
                dr = (dxhat - xhat * c1) * rstd
            else:
                c2 = tl.sum(dxhat, axis=0) / C
                dr = (dxhat - xhat * c1 - c2) * rstd
        if HAS_DR:
            dr_up = tl.load(DR + b * stride_drb + n * stride_drn + cols * stride_drc, mask=mask, other=0.0)
            dr += dr_up.to(tl.float32)
        if HAS_RES:
            tl.store(DRES + row * C + cols, dr.to(DRES.dtype.element_ty), mask=mask)
            if HAS_GATE:
                y = tl.load(X + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
                gate = tl.load(GATE + b * stride_gb + g * stride_gg + cols, mask=mask, other=0.0)
                acc_gate += dr * y
                dr = dr * gate.to(tl.float32)
        tl.store(DX + row * C + cols, dr.to(DX.dtype.element_ty), mask=mask)
    if HAS_GATE:
        _accumulate_into(DGATE_P, (slot + cur_g) * C, acc_gate, cols, mask)
    if HAS_SHIFT:
        _accumulate_into(DSHIFT_P, (slot + cur_g) * C, acc_shift, cols, mask)
    if HAS_SCALE:
        _accumulate_into(DSCALE_P, (slot + cur_g) * C, acc_scale, cols, mask)
    if HAS_W:
        tl.store(DW_P + (b * n_chunks + chunk) * C + cols, acc_w, mask=mask)
    if HAS_B:
        tl.store(DB_P + (b * n_chunks + chunk) * C + cols, acc_b, mask=mask)


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Block size and warps for one row of ``C`` channels (whole row in registers)."""

    block_c: int
    num_warps: int
    num_stages: int = 1


def launch_config(C: int, *, backward: bool = False) -> LaunchConfig:
    """Pick the row block: the next power of two >= C, ~16 fp32 values per thread in the
    forward, ~8 in the backward (it keeps five fp32 accumulators per row live)."""
    block_c = max(triton.next_power_of_2(C), 16)
    per_thread = 8 if backward else 16
    num_warps = min(max(block_c // (32 * per_thread), 1), 16)
    return LaunchConfig(block_c, num_warps)


def bwd_chunks(B: int, N: int, G: int, C: int, device: torch.device) -> tuple[int, int]:
    """``(n_chunks, rows_per_chunk)`` for the backward grid ``(B, n_chunks)``.

    About four programs per SM on CUDA, a few under the interpreter; capped so the fp32
    partial buffer ``[B, n_chunks, G, C]`` stays under ~32M elements.
    """
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    per_sample = max(1, target // max(B, 1))
    per_sample = min(per_sample, max(1, (1 << 25) // max(B * G * C, 1)))
    rows_per_chunk = triton.cdiv(N, min(per_sample, N))
    return triton.cdiv(N, rows_per_chunk), rows_per_chunk


def _mod3(m: Tensor | None) -> Tensor | None:
    """Modulation as ``[B, G, C]`` (a view; G=1 for ``[B, C]``)."""
    if m is None:
        return None
    return m.unsqueeze(1) if m.dim() == 2 else m


def _strides2(t: Tensor | None) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _adaln_fwd_launch(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm):
    B, N, C = x.shape
    out_dtype = residual.dtype if residual is not None else x.dtype
    r_out = torch.empty((B, N, C), dtype=out_dtype, device=x.device) if residual is not None else x.new_empty(0)
    out = torch.empty((B, N, C), dtype=out_dtype, device=x.device) if do_norm else x.new_empty(0)
    n_stats = B * N if do_norm else 0
    mean = torch.zeros(n_stats, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_stats, dtype=torch.float32, device=x.device)
    if B * N == 0:
        return r_out, out, mean.view(B, N) if do_norm else mean, rstd.view(B, N) if do_norm else rstd
    gate3, shift3, scale3 = _mod3(gate), _mod3(shift), _mod3(scale)
    cfg = launch_config(C)
    launch(_adaln_fwd_kernel, (B * N,))(
        x, residual if residual is not None else x, gate3 if gate3 is not None else x,
        shift3 if shift3 is not None else x, scale3 if scale3 is not None else x,
        index if index is not None else x, weight if weight is not None else x,
        bias if bias is not None else x,
        r_out if residual is not None else x, out if do_norm else x, mean, rstd,
        N, C,
        x.stride(0), x.stride(1), *_strides2(residual),
        *_strides2(gate3), *_strides2(shift3), *_strides2(scale3), *_strides2(index),
        float(eps),
        HAS_RES=residual is not None, HAS_GATE=gate is not None, HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None, HAS_INDEX=index is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, IS_RMS=rms, DO_NORM=do_norm, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if do_norm:
        mean, rstd = mean.view(B, N), rstd.view(B, N)
    return r_out, out, mean, rstd


def _adaln_bwd_launch(dr, dout, x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd, rms, do_norm):
    B, N, C = x.shape
    dev = x.device
    has_dout = do_norm and dout is not None and dout.numel() > 0
    has_dr = residual is not None and dr is not None and dr.numel() > 0
    dx = torch.empty((B, N, C), dtype=x.dtype, device=dev)
    dres = torch.empty((B, N, C), dtype=residual.dtype, device=dev) if residual is not None else x.new_empty(0)
    gate3, shift3, scale3 = _mod3(gate), _mod3(shift), _mod3(scale)
    G = max((m.shape[1] for m in (gate3, shift3, scale3) if m is not None), default=1)
    n_chunks, rows_per_chunk = bwd_chunks(B, N, G, C, dev) if N > 0 else (0, 1)

    def partial(m: Tensor | None) -> Tensor:
        return torch.zeros((B, n_chunks, G, C), dtype=torch.float32, device=dev) if m is not None else x.new_empty(0)

    dgate_p, dshift_p, dscale_p = partial(gate3), partial(shift3), partial(scale3)
    dw_p = torch.empty((B * n_chunks, C), dtype=torch.float32, device=dev) if weight is not None else x.new_empty(0)
    db_p = torch.empty((B * n_chunks, C), dtype=torch.float32, device=dev) if bias is not None else x.new_empty(0)
    if B * N > 0:
        cfg = launch_config(C, backward=True)
        norm_in = r if residual is not None else x
        launch(_adaln_bwd_kernel, (B, n_chunks))(
            dout if has_dout else x, dr if has_dr else x, x, norm_in,
            gate3 if gate3 is not None else x, scale3 if scale3 is not None else x,
            index if index is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, mean if has_dout else x, rstd if has_dout else x,
            dx, dres if residual is not None else x,
            dgate_p if gate is not None else x, dshift_p if shift is not None else x,
            dscale_p if scale is not None else x, dw_p if weight is not None else x,
            db_p if bias is not None else x,
            N, C, G, n_chunks, rows_per_chunk,
            x.stride(0), x.stride(1), norm_in.stride(0), norm_in.stride(1),
            *(dout.stride() if has_dout else (0, 0, 0)), *(dr.stride() if has_dr else (0, 0, 0)),
            *_strides2(gate3), *_strides2(scale3), *_strides2(index),
            HAS_RES=residual is not None, HAS_GATE=gate is not None,
            HAS_SHIFT=has_dout and shift is not None, HAS_SCALE=has_dout and scale is not None,
            HAS_INDEX=index is not None, HAS_W=has_dout and weight is not None,
            HAS_B=has_dout and bias is not None, IS_RMS=rms, HAS_DOUT=has_dout, HAS_DR=has_dr,
            BLOCK_C=cfg.block_c, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    def finish(p: Tensor, like: Tensor | None) -> Tensor:
        """Sum the per-chunk partials into the modulation's own shape and dtype."""
        if like is None:
            return x.new_empty(0)
        return p.sum(1).reshape(like.shape).to(like.dtype)

    dgate, dshift, dscale = finish(dgate_p, gate), finish(dshift_p, shift), finish(dscale_p, scale)
    dweight = dw_p.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dbias = db_p.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dres, dgate, dshift, dscale, dweight, dbias


# ----------------------------------------------------------------------------------------
# Registered ops and autograd
# ----------------------------------------------------------------------------------------


def _adaln_fwd_fake(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm):
    B, N, C = x.shape
    dt = residual.dtype if residual is not None else x.dtype
    r = x.new_empty((B, N, C), dtype=dt) if residual is not None else x.new_empty(0)
    out = x.new_empty((B, N, C), dtype=dt) if do_norm else x.new_empty(0)
    stats = (B, N) if do_norm else (0,)
    return r, out, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@mugv_op("adaln_fwd", fake=_adaln_fwd_fake)
def _adaln_fwd(
    x: Tensor,
    residual: Tensor | None,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    index: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    do_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mugv::adaln_fwd``: returns ``(r, out, mean, rstd)``; ``r`` is empty without a
    residual, ``out``/``mean``/``rstd`` are empty when ``do_norm`` is False."""
    if use_triton(x):
        return _adaln_fwd_launch(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm)
    return adaln_fwd_ref(x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm)


def _adaln_bwd_fake(dr, dout, x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd, eps, rms, do_norm):
    def like(t: Tensor | None) -> Tensor:
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return like(x), like(residual), like(gate), like(shift), like(scale), like(weight), like(bias)


@mugv_op("adaln_bwd", fake=_adaln_bwd_fake)
def _adaln_bwd(
    dr: Tensor | None,
    dout: Tensor | None,
    x: Tensor,
    residual: Tensor | None,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    index: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    r: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    rms: bool,
    do_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``mugv::adaln_bwd``: ``(dx, dresidual, dgate, dshift, dscale, dweight, dbias)``,
    each empty where the input was None."""
    if use_triton(x):
        return _adaln_bwd_launch(dr, dout, x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd, rms, do_norm)
    return adaln_bwd_ref(dr, dout, x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd, eps, rms, do_norm)


def _adaln_setup_context(ctx, inputs, output):
    x, residual, gate, shift, scale, index, weight, bias, eps, rms, do_norm = inputs
    r, _, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, residual, gate, shift, scale, index, weight, bias, r if residual is not None else None, mean, rstd)
    ctx.eps, ctx.rms, ctx.do_norm = eps, rms, do_norm


def _adaln_backward(ctx, dr, dout, _dmean, _drstd):
    x, residual, gate, shift, scale, index, weight, bias, r, mean, rstd = ctx.saved_tensors
    grads = torch.ops.mugv.adaln_bwd(
        dr=dr, dout=dout, x=x, residual=residual, gate=gate, shift=shift, scale=scale, index=index,
        weight=weight, bias=bias, r=r, mean=mean, rstd=rstd, eps=ctx.eps, rms=ctx.rms, do_norm=ctx.do_norm,
    )  # fmt: skip
    dx, dres, dgate, dshift, dscale, dweight, dbias = grads

    def keep(g: Tensor, t: Tensor | None) -> Tensor | None:
        return g if t is not None else None

    return (
        dx, keep(dres, residual), keep(dgate, gate), keep(dshift, shift), keep(dscale, scale),
        None, keep(dweight, weight), keep(dbias, bias), None, None, None,
    )  # fmt: skip


_adaln_fwd.register_autograd(_adaln_backward, setup_context=_adaln_setup_context)


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------

_NORMS = {"layer": False, "rms": True}


def _check_index(index: Tensor, G: int) -> None:
    """Range check of ``index`` in eager mode (a host sync; skipped while compiling)."""
    if index.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= G:
        raise ValueError(f"index values must lie in [0, {G}) (G rows of modulation), got range [{lo}, {hi}]")


@dataclass(frozen=True)
class _AdaLNCall:
    """The validated arguments of one call of the family, in the names of ``mugv::adaln_fwd``.

    ``x`` is the norm input (:func:`ada_layer_norm`) or the branch output ``y`` (with a
    ``residual``); every tensor has unit stride on C. Built by :func:`_prepare`.
    """

    x: Tensor
    residual: Tensor | None = None
    gate: Tensor | None = None
    shift: Tensor | None = None
    scale: Tensor | None = None
    index: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 1e-6
    rms: bool = False
    do_norm: bool = True

    def run(self, backend: str) -> tuple[Tensor | None, Tensor | None]:
        """``(r, out)`` by ``backend``: ``r`` is None without a residual, ``out`` None
        without the norm. ``"reference"`` runs :func:`ada_norm_chain` (plain PyTorch)."""
        if check_backend(backend, self.x, choices=BACKENDS) == "reference":
            return ada_norm_chain(
                self.x, self.residual, self.gate, self.shift, self.scale, self.index,
                self.weight, self.bias, self.eps, self.rms, self.do_norm,
            )  # fmt: skip
        r, out, _, _ = torch.ops.mugv.adaln_fwd(
            x=self.x, residual=self.residual, gate=self.gate, shift=self.shift, scale=self.scale,
            index=self.index, weight=self.weight, bias=self.bias, eps=self.eps, rms=self.rms,
            do_norm=self.do_norm,
        )  # fmt: skip
        return (r if self.residual is not None else None), (out if self.do_norm else None)


def _prepare(
    x_name: str,
    x: Tensor,
    *,
    residual: Tensor | None = None,
    gate: Tensor | None = None,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    index: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layer",
    do_norm: bool = True,
    validate: bool = True,
) -> _AdaLNCall:
    """Validate the family's inputs (``x_name`` names ``x`` in the messages); return them
    ready for the op (unit stride on C)."""
    check_tensor(x_name, x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, C = x.shape
    dev = x.device
    if C == 0 or C > MAX_C:
        raise ValueError(f"{x_name} must have 1 <= C <= {MAX_C} channels, got C={C}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != {x_name} shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} != {x_name} dtype {x.dtype}")
    groups = set()
    for name, m in (("gate", gate), ("shift", shift), ("scale", scale)):
        if m is None:
            continue
        check_tensor(name, m, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=dev)
        if m.shape[0] != B or m.shape[-1] != C:
            raise ValueError(
                f"{name} must be [B, C] or [B, G, C] with B={B}, C={C} (from {x_name}), got {tuple(m.shape)}"
            )
        if m.dim() == 3:
            groups.add(m.shape[1])
    if len(groups) > 1:
        raise ValueError(f"gate/shift/scale must share G, got G values {sorted(groups)}")
    G = groups.pop() if groups else 1
    if index is not None:
        check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES, device=dev)
        if tuple(index.shape) != (B, N):
            raise ValueError(f"index must have shape (B, N) = {(B, N)}, got {tuple(index.shape)}")
        if validate:
            _check_index(index, G)
    elif G > 1:
        raise ValueError(f"modulation has G={G} rows per sample: pass index [B, N] to select one per token")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
            if p.shape[0] != C:
                raise ValueError(f"{name} must have shape ({C},), got {tuple(p.shape)}")

    def fix(t: Tensor | None) -> Tensor | None:
        return last_dim_contiguous(t) if t is not None else None

    return _AdaLNCall(
        x=fix(x), residual=fix(residual), gate=fix(gate), shift=fix(shift), scale=fix(scale), index=index,
        weight=fix(weight), bias=fix(bias), eps=float(eps), rms=_NORMS[norm], do_norm=do_norm,
    )  # fmt: skip


def ada_layer_norm(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor | None,
    *,
    index: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layer",
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """adaLN-modulated norm: ``(norm(x) * weight + bias) * (1 + scale) + shift``.

    MUG-V's ``t2i_modulate(norm(x), shift, scale)`` (arXiv 2510.17519 Sec. 3, public
    ``mug_v/dit/model.py``) in one pass; statistics in fp32.

    Args:
        x: ``[B, N, C]`` fp32/bf16/fp16 (fp64 runs the reference), any strides.
        shift, scale: ``[B, C]`` (one set per sample) or ``[B, G, C]`` with ``index``;
            any float dtype; either may be None (``shift=scale=None``: a plain norm).
        index: ``[B, N]`` int32/int64 in ``[0, G)``: the modulation row of each token
            (image-to-video: 0 = timestep set, 1 = ``t0`` set). Range-checked in eager
            mode (one host sync); not checked under ``torch.compile``.
        weight, bias: optional ``[C]`` affine of the norm, applied before modulation.
        eps: added to the variance (default 1e-6, as MUG-V).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm).
        validate: range-check ``index`` (a host sync per call in eager mode). Pass False
            when the caller built ``index`` itself (the DiT does: 4 calls per block).
        backend: ``"auto"`` (default: the Triton kernel on CUDA and under
            ``TRITON_INTERPRET=1``, the explicit reference on plain CPU and in fp64),
            ``"triton"`` or ``"reference"`` (the differentiable PyTorch reference
            :func:`mugv_kernels.reference.ada_norm_chain`, no custom op).

    Returns:
        ``[B, N, C]`` in ``x.dtype`` (contiguous from the kernel).

    Raises:
        TypeError: a non-tensor or an unsupported dtype.
        ValueError: wrong rank, B/C mismatch, mixed devices, G without ``index``, index
            of the wrong shape or out of range, unknown ``norm``, eps <= 0, an unknown
            backend or ``"triton"`` where Triton cannot run.
    """
    call = _prepare(
        "x", x, shift=shift, scale=scale, index=index, weight=weight, bias=bias, eps=eps, norm=norm, validate=validate
    )
    return call.run(backend)[1]


def gated_residual(
    residual: Tensor,
    y: Tensor,
    gate: Tensor | None,
    *,
    index: Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Gated residual ``residual + gate * y`` (``gate=None``: ``residual + y``).

    Args:
        residual, y: ``[B, N, C]`` of the same dtype (fp32/bf16/fp16; fp64 runs the reference), any strides.
        gate: ``[B, C]`` or ``[B, G, C]`` (with ``index``), any float dtype, or None.
        index: ``[B, N]`` int32/int64 rows into G.
        validate, backend: as :func:`ada_layer_norm`.

    Returns:
        ``[B, N, C]`` in ``residual.dtype`` (sum computed in fp32).

    Raises:
        TypeError / ValueError: as :func:`ada_layer_norm`.
    """
    call = _prepare("y", y, residual=residual, gate=gate, index=index, do_norm=False, validate=validate)
    return call.run(backend)[0]


def gated_residual_ada_layer_norm(
    residual: Tensor,
    y: Tensor,
    gate: Tensor | None,
    shift: Tensor | None,
    scale: Tensor | None,
    *,
    index: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layer",
    validate: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The whole sub-layer boundary in one pass:
    ``r = residual + gate * y``; ``out = (norm(r) * weight + bias) * (1 + scale) + shift``.

    Args:
        residual, y: ``[B, N, C]`` of the same dtype (fp32/bf16/fp16; fp64 runs the reference), any strides.
        gate, shift, scale: ``[B, C]`` or ``[B, G, C]`` (with ``index``), or None
            (``gate=None``: plain residual, MUG-V's cross-attention; ``shift=scale=None``:
            a plain norm).
        index, weight, bias, eps, norm, validate, backend: as :func:`ada_layer_norm`.

    Returns:
        ``(r, out)``: the new residual stream and the modulated norm of it, both
        ``[B, N, C]`` in ``residual.dtype``. ``out`` normalizes ``r`` as stored (rounded to
        its dtype), so the backward is exact for what the next layer sees.

    Raises:
        TypeError / ValueError: as :func:`ada_layer_norm`, plus residual/y mismatch.
    """
    call = _prepare(
        "y", y, residual=residual, gate=gate, shift=shift, scale=scale, index=index,
        weight=weight, bias=bias, eps=eps, norm=norm, validate=validate,
    )  # fmt: skip
    return call.run(backend)


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile cases: the launches the ops make at the benchmark shapes
# ----------------------------------------------------------------------------------------


@register_aot_cases("ada_norm")
def _aot_cases() -> None:
    """MUG-V 10B / 1B widths at the 5 s 720p token count, bf16, as the DiT calls them:
    self-attn/MLP boundaries (gated residual + modulated LayerNorm, G=1 and I2V G=2),
    the cross-attention norm (plain residual, affine LayerNorm), the block input norm and
    the final gated residual; forward and backward; plus the RMSNorm variant."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    B, N = 1, 50402
    for C in (3456, 1152):
        x = torch.empty(B, N, C, **meta)
        res = torch.empty(B, N, C, **meta)
        w = torch.empty(C, **meta)
        for G in (1, 2):
            mod = torch.empty(B, G, C, **meta) if G > 1 else torch.empty(B, C, **meta)
            idx = torch.empty(B, N, device="meta", dtype=torch.int32) if G > 1 else None
            variants = [
                dict(residual=res, gate=mod, shift=mod, scale=mod, weight=None, bias=None, rms=False, do_norm=True),
                dict(residual=None, gate=None, shift=mod, scale=mod, weight=None, bias=None, rms=False, do_norm=True),
                dict(residual=res, gate=mod, shift=None, scale=None, weight=None, bias=None, rms=False, do_norm=False),
            ]
            if G == 1:
                variants.append(
                    dict(residual=res, gate=None, shift=None, scale=None, weight=w, bias=w, rms=False, do_norm=True)
                )
                variants.append(
                    dict(residual=None, gate=None, shift=mod, scale=mod, weight=w, bias=None, rms=True, do_norm=True)
                )
            for v in variants:
                args = (x, v["residual"], v["gate"], v["shift"], v["scale"], idx, v["weight"], v["bias"])
                r, out, mean, rstd = _adaln_fwd_launch(*args, 1e-6, v["rms"], v["do_norm"])
                dout = torch.empty(B, N, C, **meta) if v["do_norm"] else None
                dr = torch.empty(B, N, C, **meta) if v["residual"] is not None else None
                _adaln_bwd_launch(dr, dout, *args, r, mean, rstd, v["rms"], v["do_norm"])
