"""Ulysses context parallelism for the packed DiT, applied from outside the model.

DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv 2309.14509): the ``cp`` ranks of a context-parallel
group each hold a contiguous ``1/cp`` share of the packed token stream of their micro-batch; the
token-local work (adaLN, QK-norm + 3D RoPE with each token's own positions, the MLP, the
linears) runs on the share, and self-attention swaps the sharded axis from tokens to heads with
one all-to-all before and one after::

    q, k, v [n, H, D]  --all_to_all-->  [N, H/cp, D]  --varlen_attention(cu_seqlens)-->
    [N, H/cp, D]  --all_to_all-->  [n, H, D]          (n = ceil(N / cp), N = packed tokens)

Clip boundaries in ``cu_seqlens`` may fall anywhere inside a share: attention sees the whole
sequence (all heads of a group), so no boundary needs to align. Cross-attention needs no
communication: the queries stay sharded, the captions are small and every rank holds all of
them, and the query offsets are cut to the share (``clamp(cu_seqlens, s, e) - s``; a clip with
no token in the share gets an empty segment).

How it attaches (the model knows nothing of it): :func:`apply_context_parallel` registers a
forward pre-hook on every DiT block and on the final layer. The first block's hook cuts the
residual stream ``x [1, N, C]`` to this rank's share (zero-padded to ``cp * n``) and replaces the
:class:`~mugv.models.dit_layers.PackedBatch` by a :class:`UlyssesBatch`, whose modulation index
and RoPE positions are the share's and whose :meth:`UlyssesBatch.attention` does the exchange
above; the final layer's forward hook all-gathers the output back to ``[1, N, F]``, so
``MUGDiT.forward_packed`` returns full clips on every rank of the group.

Collectives are ``torch.distributed._functional_collectives`` with autograd
(``all_to_all_single_autograd``, ``all_gather_single_autograd``), so the backward pass is the
transpose exchange and ``torch.compile`` traces them. Gradient bookkeeping: every rank of a group
computes the loss of the whole micro-batch; the backward of the all-gather sums the ``cp``
copies, so a rank's local gradient is ``cp`` times its share's, and FSDP's mean over
``dp x cp`` ranks with the trainer's loss scale of ``world_size`` (its statistics, all-reduced
over every rank, count each micro-batch ``cp`` times) gives exactly the single-process gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol

import mugv_kernels as mk
from mugv.models.dit_layers import PackedBatch

__all__ = ["ContextParallel", "UlyssesBatch", "apply_context_parallel", "check_cp_heads", "shard_range"]

#: The fields of :class:`PackedBatch`, read once (``dataclasses.fields`` inside a hook would
#: break the graph of a compiled block).
_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(PackedBatch))


def check_cp_heads(num_heads: int, cp: int) -> None:
    """Raise ``ValueError`` unless ``cp`` divides ``num_heads`` (Ulysses splits heads across the group).

    Raises:
        ValueError: ``cp < 1`` or ``num_heads % cp != 0`` (the message lists the valid degrees).
    """
    if cp < 1:
        raise ValueError(f"context parallel degree must be >= 1, got {cp}")
    if num_heads % cp:
        ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"Ulysses context parallelism splits attention heads across the cp group: num_heads={num_heads} "
            f"is not divisible by cp={cp}; valid cp for this model: {ok}"
        )


def shard_range(total: int, cp: int, rank: int) -> tuple[int, int, int]:
    """``(start, end, n)``: rank ``rank``'s tokens ``[start, end)`` of ``total`` packed tokens,
    each rank owning ``n = ceil(total / cp)`` slots (the last share is zero-padded to ``n``)."""
    n = -(-total // cp)
    start = min(rank * n, total)
    return start, min(start + n, total), n


@dataclass
class UlyssesBatch(PackedBatch):
    """A :class:`~mugv.models.dit_layers.PackedBatch` for one rank's share of the tokens.

    ``index [1, n]`` and ``positions [n, 3]`` are the share's (padding slots use row 0 and
    position 0; their outputs are discarded). The clip segmentation stays global
    (``cu_seqlens``, ``max_seqlen``: self-attention runs on the whole sequence after the
    all-to-all); cross-attention uses ``local_cu_seqlens`` (the offsets cut to the share).

    Extra attributes:
        group: the ``cp`` process group (or ``(mesh, dim)``) of the all-to-alls.
        cp: group size; ``total``: packed tokens ``N``; ``n_local``: slots per rank;
        n_valid: real tokens of this share (``< n_local`` only on the last share);
        local_cu_seqlens: ``[n_clips + 1]`` int32 query offsets within the share.
    """

    group: object = None
    cp: int = 1
    total: int = 0
    n_local: int = 0
    n_valid: int = 0
    local_cu_seqlens: Tensor | None = None

    def _to_heads(self, t: Tensor) -> Tensor:
        """``[n, H, D]`` token share -> ``[N, H/cp, D]`` head share (one all-to-all)."""
        n, H, D = t.shape
        t = t.reshape(n, self.cp, H // self.cp, D).transpose(0, 1).contiguous()  # [cp, n, H/cp, D]
        t = funcol.all_to_all_single_autograd(t.reshape(self.cp * n, H // self.cp, D), None, None, self.group)
        return t[: self.total]

    def _to_tokens(self, t: Tensor) -> Tensor:
        """``[N, H/cp, D]`` head share -> ``[n, H, D]`` token share (the inverse all-to-all)."""
        N, h, D = t.shape
        t = F.pad(t, (0, 0, 0, 0, 0, self.cp * self.n_local - N))  # [cp*n, H/cp, D]
        t = funcol.all_to_all_single_autograd(t.contiguous(), None, None, self.group)  # chunk j: heads of rank j
        return t.reshape(self.cp, self.n_local, h, D).transpose(0, 1).reshape(self.n_local, self.cp * h, D)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, cross: bool, scale: float) -> Tensor:
        """``q [n, H, D]`` of the share; ``k, v [n, H, D]`` (self) or the captions ``[L, H, D]``
        (cross) -> ``[n, H, D]``."""
        if cross:
            o = mk.varlen_attention(
                q[: self.n_valid], k, v, self.local_cu_seqlens, self.text_cu_seqlens,
                min(self.max_seqlen, max(self.n_valid, 1)), self.text_max_seqlen, scale=scale,
                backend=self.attn_backend, validate=False,
            )  # fmt: skip
            return F.pad(o, (0, 0, 0, 0, 0, self.n_local - self.n_valid))
        qh, kh, vh = self._to_heads(q), self._to_heads(k), self._to_heads(v)  # [N, H/cp, D]
        o = mk.varlen_attention(
            qh, kh, vh, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen, scale=scale,
            backend=self.attn_backend, validate=False,
        )  # fmt: skip
        return self._to_tokens(o)


class ContextParallel:
    """The hooks :func:`apply_context_parallel` registers, and their per-forward state.

    Attributes:
        group: the ``cp`` group; ``cp``: its size; ``rank``: this rank's place in it.
        handles: the hook handles (``remove()`` undoes the wrapping).
    """

    def __init__(self, group, cp: int, rank: int) -> None:
        self.group, self.cp, self.rank = group, cp, rank
        self.handles: list = []
        self._cache: tuple[Tensor, UlyssesBatch] | None = None  # (full index, its share) of this forward

    def shard_batch(self, batch: PackedBatch) -> UlyssesBatch:
        """The :class:`UlyssesBatch` of this rank for a full ``batch`` (``N = positions.shape[0]``)."""
        total = batch.positions.shape[0]
        s, e, n = shard_range(total, self.cp, self.rank)
        pad = n - (e - s)
        index = F.pad(batch.index[:, s:e], (0, pad))  # [1, n]
        positions = F.pad(batch.positions[s:e], (0, 0, 0, pad))  # [n, 3]
        local_cu = (batch.cu_seqlens.clamp(s, e) - s).to(batch.cu_seqlens.dtype)
        fields = {name: getattr(batch, name) for name in _BATCH_FIELDS}
        fields.update(index=index, positions=positions)
        return UlyssesBatch(**fields, group=self.group, cp=self.cp, total=total, n_local=n, n_valid=e - s,
                            local_cu_seqlens=local_cu)

    def _local_batch(self, batch: PackedBatch) -> UlyssesBatch:
        """The share of ``batch``, built once per forward. FSDP's input casting copies the
        dataclass (its integer tensors stay the same objects), so the cache is keyed on
        the ``index`` tensor, not on the batch object."""
        if isinstance(batch, UlyssesBatch):
            return batch
        if self._cache is None or self._cache[0] is not batch.index:
            self._cache = (batch.index, self.shard_batch(batch))
        return self._cache[1]

    def first_block_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """``(x [1, N, C], batch)`` -> ``(x share [1, n, C], UlyssesBatch)``."""
        x, batch = args[0], args[1]
        if isinstance(batch, UlyssesBatch):
            return None
        local = self._local_batch(batch)
        s, e, n = shard_range(local.total, self.cp, self.rank)
        x = F.pad(x[:, s:e], (0, 0, 0, n - (e - s)))
        return (x, local, *args[2:])

    def block_pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Later blocks: the full batch -> this rank's :class:`UlyssesBatch`."""
        return (args[0], self._local_batch(args[1]), *args[2:])

    def final_pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Final layer ``(x share, t_emb, batch)``: the batch -> the share's."""
        return (args[0], args[1], self._local_batch(args[2]), *args[3:])

    def final_hook(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        """Final layer output ``[1, n, F]`` -> all-gathered ``[1, N, F]``."""
        local = args[2]
        self._cache = None
        full = funcol.all_gather_single_autograd(out.contiguous(), 1, self.group)  # [1, cp*n, F]
        return full[:, : local.total]

    def remove(self) -> None:
        """Unregister every hook (the model runs unsharded again)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def apply_context_parallel(model: nn.Module, cp_mesh) -> ContextParallel:
    """Shard the packed sequence of ``model`` (a :class:`~mugv.models.MUGDiT`) over ``cp_mesh``.

    Args:
        model: a model with ``blocks`` (an ``nn.ModuleList`` whose items take ``(x, batch)``),
            ``final_layer`` (takes ``(x, t_emb, batch)``) and ``cfg.num_heads``. Blocks may
            already be wrapped (activation checkpointing, compile); apply before FSDP.
        cp_mesh: a 1-D ``DeviceMesh`` (the ``"cp"`` dim of the training mesh).

    Returns:
        The :class:`ContextParallel` holding the hooks (``.remove()`` undoes them).

    Raises:
        TypeError: no ``blocks`` ModuleList or no ``final_layer``.
        ValueError: ``num_heads`` not divisible by the mesh size.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or not hasattr(model, "final_layer"):
        raise TypeError("apply_context_parallel: expected a DiT with a non-empty blocks ModuleList and a final_layer")
    cp = cp_mesh.size()
    check_cp_heads(model.cfg.num_heads, cp)
    state = ContextParallel(cp_mesh, cp, cp_mesh.get_local_rank())
    state.handles.append(blocks[0].register_forward_pre_hook(state.first_block_pre_hook))
    for blk in list(blocks)[1:]:
        state.handles.append(blk.register_forward_pre_hook(state.block_pre_hook))
    state.handles.append(model.final_layer.register_forward_pre_hook(state.final_pre_hook))
    state.handles.append(model.final_layer.register_forward_hook(state.final_hook))
    return state
