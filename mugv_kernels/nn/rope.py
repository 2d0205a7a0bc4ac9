"""Drop-in module for the QK-RMSNorm + 3D RoPE family (:mod:`mugv_kernels.ops.rope`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mugv_kernels.ops.rope import _check_sections, qk_norm_rope3d

__all__ = ["QKNormRoPE3D"]


class QKNormRoPE3D(nn.Module):
    """Per-head RMSNorm of Q and K (learned ``[D]`` weights) followed by 3D RoPE, fused.

    Replaces MUG-V's ``q_norm``/``k_norm`` (``RMSNorm(head_dim)``) and the two
    ``apply_rotary_emb`` calls of ``Attention.forward`` (public ``mug_v/dit/module.py``)
    with one :func:`mugv_kernels.qk_norm_rope3d` call.

    Args:
        head_dim: D.
        sections: three even ints summing to at most D (default: MUG-V's
            ``(D//3, D//3, D//3)`` rounded down to even, for (h, w, t)).
        eps: RMSNorm epsilon (default 1e-6).
        theta: RoPE base (default 1e4).
        interleaved: pair layout (True: MUG-V / ``view_as_complex``; False: rotate-half).
        qk_norm: learn ``q_weight``/``k_weight`` (ones) and normalize; False applies only
            the rotation (no parameters).

    Shapes:
        ``forward(q, k, positions, *, check_positions=True)`` with q, k ``[B, N, H, D]``
        or ``[total, H, D]`` and positions ``[B, N, 3]`` / ``[N, 3]`` / ``[total, 3]``
        (int32/int64); returns ``(q_out, k_out)`` of the shapes and dtype of q and k.
        ``check_positions=False`` skips the range check's host sync (check once per
        model forward instead of once per block).

    Raises:
        ValueError: bad ``head_dim``/``sections`` at construction; as
            :func:`mugv_kernels.qk_norm_rope3d` in ``forward``.
    """

    def __init__(
        self,
        head_dim: int,
        sections: Sequence[int] | None = None,
        *,
        eps: float = 1e-6,
        theta: float = 10000.0,
        interleaved: bool = True,
        qk_norm: bool = True,
    ):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if sections is None:
            third = (head_dim // 3) // 2 * 2
            sections = (third, third, third)
        self.head_dim = head_dim
        self.sections = tuple(_check_sections(sections, head_dim))
        self.eps, self.theta, self.interleaved = eps, theta, interleaved
        if qk_norm:
            self.q_weight = nn.Parameter(torch.ones(head_dim))
            self.k_weight = nn.Parameter(torch.ones(head_dim))
        else:
            self.register_parameter("q_weight", None)
            self.register_parameter("k_weight", None)

    def forward(
        self, q: Tensor, k: Tensor, positions: Tensor, *, check_positions: bool = True
    ) -> tuple[Tensor, Tensor]:
        return qk_norm_rope3d(
            q, k, positions, self.sections, q_weight=self.q_weight, k_weight=self.k_weight,
            eps=self.eps, theta=self.theta, interleaved=self.interleaved, check_positions=check_positions,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.head_dim}, sections={self.sections}, eps={self.eps}, theta={self.theta}, "
            f"interleaved={self.interleaved}, qk_norm={self.q_weight is not None}"
        )
