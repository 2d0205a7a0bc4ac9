"""mugv_kernels: fused, training-grade kernels for video diffusion transformers.

Every op is a ``torch.library`` custom op in the ``mugv`` namespace (forward, backward,
fake implementation, ``torch.compile``-clean) with a PyTorch reference that is also the
CPU path. ``import mugv_kernels as mk`` and call the functions below; drop-in modules are
in :mod:`mugv_kernels.nn`.

Every op takes ``backend=``: ``"auto"`` (default), ``"triton"``, ``"reference"`` (the
differentiable PyTorch reference, no custom op), plus the family's own (``"cuda"`` for
:func:`causal_conv3d` and :func:`group_norm_silu`; the attention backends of
:func:`varlen_attention`). :func:`is_capturing` is true while the ahead-of-time compile
check records kernel launches instead of running them (:mod:`mugv_kernels.aot`).
"""

from mugv_kernels.ops.ada_norm import ada_layer_norm, gated_residual, gated_residual_ada_layer_norm
from mugv_kernels.ops.conv3d import causal_conv3d
from mugv_kernels.ops.group_norm import group_norm_silu
from mugv_kernels.ops.packing import pack, unpack
from mugv_kernels.ops.rope import qk_norm_rope3d, rope3d, video_positions
from mugv_kernels.ops.varlen_attention import varlen_attention, varlen_attention_backends

__all__ = [
    "ada_layer_norm",
    "causal_conv3d",
    "gated_residual",
    "gated_residual_ada_layer_norm",
    "group_norm_silu",
    "pack",
    "qk_norm_rope3d",
    "rope3d",
    "unpack",
    "varlen_attention",
    "varlen_attention_backends",
    "video_positions",
]

# Each public op runs inside an NVTX range named ``mugv.<op>`` when ``MUGV_NVTX=1`` at
# import; otherwise ``annotate`` returns the function itself (no wrapper).
from mugv_kernels._nvtx import annotate as _annotate  # noqa: E402

for _name in __all__:
    globals()[_name] = _annotate(f"mugv.{_name}")(globals()[_name])
del _name

from mugv_kernels._registry import is_capturing  # noqa: E402  (a query, not an op: no NVTX range)

__all__ += ["is_capturing"]

__version__ = "0.1.0"
