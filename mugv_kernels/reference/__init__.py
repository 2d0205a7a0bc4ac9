"""Pure-PyTorch references for every op family: the definition of "correct" that the
tests and benchmarks share, and the path plain CPU tensors run."""

from mugv_kernels.reference.ada_norm import (
    ada_norm_chain,
    adaln_bwd_ref,
    adaln_fwd_ref,
    select_modulation,
)

from mugv_kernels.reference.attention import attention_ref, varlen_attention_ref

__all__ = ["ada_norm_chain", "adaln_bwd_ref", "adaln_fwd_ref", "select_modulation"]
__all__ += ["attention_ref", "varlen_attention_ref"]

from mugv_kernels.reference.rope import (  # noqa: E402
    qk_norm_rope3d_ref,
    rope3d_bwd_ref,
    rope3d_fwd_ref,
    rope_tables,
    video_positions_ref,
)

__all__ += ["qk_norm_rope3d_ref", "rope3d_bwd_ref", "rope3d_fwd_ref", "rope_tables", "video_positions_ref"]

from mugv_kernels.reference.conv3d import (  # noqa: E402
    causal_conv3d_ref,
    conv3d_padded_ref,
    group_norm_silu_ref,
)

__all__ += ["causal_conv3d_ref", "conv3d_padded_ref", "group_norm_silu_ref"]
