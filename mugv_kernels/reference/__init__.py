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
