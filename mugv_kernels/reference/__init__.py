"""Pure-PyTorch references for every op family: the definition of "correct" that the
tests and benchmarks share, and the path plain CPU tensors (and fp64) run.

One module per family, named as the family's file in :mod:`mugv_kernels.ops`:
``ada_norm``, ``rope``, ``varlen_attention``, ``conv3d``, ``group_norm``.
"""

from mugv_kernels.reference.ada_norm import ada_norm_chain, adaln_bwd_ref, adaln_fwd_ref, select_modulation
from mugv_kernels.reference.conv3d import causal_conv3d_ref, conv3d_padded_ref
from mugv_kernels.reference.group_norm import group_norm_silu_ref
from mugv_kernels.reference.rope import (
    qk_norm_rope3d_ref,
    rope3d_bwd_ref,
    rope3d_fwd_ref,
    rope_tables,
    video_positions_ref,
)
from mugv_kernels.reference.varlen_attention import attention_ref, varlen_attention_ref

__all__ = [
    "ada_norm_chain",
    "adaln_bwd_ref",
    "adaln_fwd_ref",
    "attention_ref",
    "causal_conv3d_ref",
    "conv3d_padded_ref",
    "group_norm_silu_ref",
    "qk_norm_rope3d_ref",
    "rope3d_bwd_ref",
    "rope3d_fwd_ref",
    "rope_tables",
    "select_modulation",
    "varlen_attention_ref",
    "video_positions_ref",
]
