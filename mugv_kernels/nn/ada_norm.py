"""Drop-in modules for the adaLN family (:mod:`mugv_kernels.ops.ada_norm`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mugv_kernels.ops.ada_norm import ada_layer_norm, gated_residual_ada_layer_norm

__all__ = ["AdaLayerNorm", "GatedResidualAdaLayerNorm"]


class AdaLayerNorm(nn.Module):
    """adaLN-modulated LayerNorm/RMSNorm: ``(norm(x) * weight + bias) * (1 + scale) + shift``.

    With ``elementwise_affine=False`` (MUG-V's modulated norms) it has no parameters; with
    ``True`` it owns ``weight``/``bias`` of shape ``[C]`` (``bias`` only for ``"layer"``),
    like ``nn.LayerNorm``, so MUG-V's affine cross-attention norm loads into it.

    Args:
        hidden_size: C.
        eps: added to the variance (default 1e-6).
        elementwise_affine: learn ``weight`` (ones) and ``bias`` (zeros).
        norm: ``"layer"`` or ``"rms"``.

    Shapes:
        ``forward(x [B, N, C], shift, scale, index=None)`` with shift/scale ``[B, C]``,
        ``[B, G, C]`` or None, ``index [B, N]``; returns ``[B, N, C]`` in ``x.dtype``.
    """

    def __init__(self, hidden_size: int, *, eps: float = 1e-6, elementwise_affine: bool = False, norm: str = "layer"):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.hidden_size, self.eps, self.norm = hidden_size, eps, norm
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.bias = nn.Parameter(torch.zeros(hidden_size)) if norm == "layer" else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(
        self, x: Tensor, shift: Tensor | None = None, scale: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        return ada_layer_norm(x, shift, scale, index=index, weight=self.weight, bias=self.bias, eps=self.eps, norm=self.norm)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, norm={self.norm!r}, elementwise_affine={self.weight is not None}"


class GatedResidualAdaLayerNorm(AdaLayerNorm):
    """``r = residual + gate * y`` then the modulated norm of ``r``, in one pass.

    Shapes:
        ``forward(residual [B, N, C], y [B, N, C], gate, shift, scale, index=None)``
        returns ``(r, out)``, both ``[B, N, C]`` in ``residual.dtype``.
    """

    def forward(  # type: ignore[override]
        self,
        residual: Tensor,
        y: Tensor,
        gate: Tensor | None = None,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return gated_residual_ada_layer_norm(
            residual, y, gate, shift, scale, index=index, weight=self.weight, bias=self.bias, eps=self.eps, norm=self.norm
        )
