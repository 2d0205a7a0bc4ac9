"""Drop-in ``nn.Module`` wrappers of the ``mugv`` ops, one module file per op family."""

from mugv_kernels.nn.ada_norm import AdaLayerNorm, GatedResidualAdaLayerNorm
from mugv_kernels.nn.attention import VarlenAttention, VarlenCrossAttention, VarlenSelfAttention

__all__ = [
    "AdaLayerNorm",
    "GatedResidualAdaLayerNorm",
    "VarlenAttention",
    "VarlenCrossAttention",
    "VarlenSelfAttention",
]

from mugv_kernels.nn.rope import QKNormRoPE3D  # noqa: E402

__all__ += ["QKNormRoPE3D"]

from mugv_kernels.nn.conv import CausalConv3d, GroupNormSiLU  # noqa: E402

__all__ += ["CausalConv3d", "GroupNormSiLU"]
