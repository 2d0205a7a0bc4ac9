"""Count the activation bytes a DiT block saves for its backward pass, per AC mode, on meta tensors.

``python -m mugv.train.memory --flavor 10b --tokens 50402 --cp 4`` builds one block of the
flavor on the meta device (no allocation) and runs its forward on this rank's share of the
tokens (``ceil(tokens / cp)``), bf16, with the PyTorch reference ops of the norms and RoPE
(which save at least what the fused kernels save: an upper bound for that part) and the
fused flash-attention op's saved tensors:

* ``none``: the bytes of every distinct tensor autograd saves (``saved_tensors_hooks``),
  parameters excluded;
* ``selective``: the block input plus the outputs of the ops
  :func:`~mugv.train.parallelize.selective_checkpoint_policy` keeps (a dispatch mode sees them);
* ``full``: the block input.

Per rank for the model: ``depth x`` the block's count, plus, for ``full`` and ``selective``,
one block's ``none`` count (what the recompute of one block holds during its backward).
Self-attention under Ulysses runs on ``[tokens, H/cp, D]``: the count uses a local reshape of
the same size as the all-to-all's output and the fused attention op's saved tensors (output
and log-sum-exp). It is a count of saved tensors, not a measurement: allocator
fragmentation, temporaries, gradients, parameters and optimizer state are not in it.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from mugv.models.dit import DiTConfig
from mugv.models.dit_layers import MUGDiTBlock, PackedBatch
from mugv.train.parallelize import AC_MODES, selective_checkpoint_policy

__all__ = ["count_block_activations", "count_model_activations", "main"]


class _CountBatch(PackedBatch):
    """Self-attention with the shapes of Ulysses (``[N, H/cp, D]``), on meta tensors."""

    cp: int = 1

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cross: bool, scale: float) -> Tensor:
        n, H, D = q.shape
        if cross:
            heads = [t.transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n or L, D]
        else:  # a local stand-in for the all-to-all: same numel, [1, H/cp, cp*n, D]
            heads = [t.reshape(n, self.cp, H // self.cp, D).permute(1, 2, 0, 3).reshape(1, H // self.cp, self.cp * n, D)
                     for t in (q, k, v)]
        o = torch.ops.aten._scaled_dot_product_flash_attention(*heads, scale=scale)[0]
        return o.reshape(1, -1, n, D).permute(0, 2, 1, 3).reshape(n, H, D)


class _Outputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.saved: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if selective_checkpoint_policy(None, func) == CheckpointPolicy.MUST_SAVE:
            self.saved += [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]
        return out


def _bytes(tensors, exclude: set[int]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key in exclude or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def count_block_activations(flavor: str, tokens: int, cp: int = 1, *, dtype: torch.dtype = torch.bfloat16,
                            backend: str = "reference") -> dict[str, int]:
    """Saved bytes of one block of ``flavor`` on a rank's share of ``tokens``, per AC mode.

    Returns:
        ``{"none": bytes, "selective": bytes, "full": bytes}``.

    Raises:
        ValueError: an unknown flavor, ``tokens < 1``, ``cp`` not dividing ``num_heads``.
    """
    from mugv.train.context_parallel import check_cp_heads

    cfg = DiTConfig.from_flavor(flavor)
    check_cp_heads(cfg.num_heads, cp)
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    n, C = math.ceil(tokens / cp), cfg.hidden_size
    with torch.device("meta"):
        blk = MUGDiTBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.rope_sections, cfg.rope_theta, cfg.eps).to(dtype)
        x = torch.empty(1, n, C, dtype=dtype, requires_grad=True)
        L = 300  # T5 caption tokens of one clip
        batch = _CountBatch(
            t_mlp=torch.empty(2, 6 * C, dtype=dtype), index=torch.zeros(1, n, dtype=torch.int32),
            positions=torch.zeros(n, 3, dtype=torch.int32), cu_seqlens=torch.tensor([0, tokens], dtype=torch.int32),
            max_seqlen=tokens, text=torch.empty(L, C, dtype=dtype), text_cu_seqlens=torch.tensor([0, L]),
            text_max_seqlen=L, backend=backend, attn_backend="reference",
        )  # fmt: skip
        batch.cp = cp
    params = {p.untyped_storage()._cdata for p in blk.parameters()}
    packed: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        blk(x, batch)
    with _Outputs() as mode:
        blk(x, batch)
    inp = x.numel() * x.element_size()
    # selective also keeps the four all-to-all outputs of self-attention (q, k, v, o: each
    # [cp*n, H/cp, D], the size of the share), which the local stand-in above does not issue
    a2a = 4 * inp if cp > 1 else 0
    return {"none": _bytes(packed, params), "selective": inp + a2a + _bytes(mode.saved, params), "full": inp}


def count_model_activations(flavor: str, tokens: int, cp: int = 1, **kw) -> dict[str, int]:
    """Per-rank saved bytes of the whole model's blocks: ``depth x`` the block count, plus one
    block's ``none`` count for the recompute of ``full``/``selective``."""
    per = count_block_activations(flavor, tokens, cp, **kw)
    depth = DiTConfig.from_flavor(flavor).depth
    return {m: depth * per[m] + (per["none"] if m != "none" else 0) for m in AC_MODES}


def main(argv=None) -> None:
    """Print a Markdown table: saved activation GiB per rank for each AC mode (a count)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="10b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[50402])
    ap.add_argument("--cp", type=int, nargs="+", default=[1])
    a = ap.parse_args(argv)
    print("| flavor | tokens | cp | tokens/rank | " + " | ".join(f"{m} (GiB)" for m in AC_MODES) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in AC_MODES) + " |")
    for tokens in a.tokens:
        for cp in a.cp:
            c = count_model_activations(a.flavor, tokens, cp)
            row = " | ".join(f"{c[m] / 2**30:.1f}" for m in AC_MODES)
            print(f"| {a.flavor} | {tokens} | {cp} | {math.ceil(tokens / cp)} | {row} |")


if __name__ == "__main__":
    main()
