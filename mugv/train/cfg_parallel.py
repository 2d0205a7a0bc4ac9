"""CFG-parallel sampling: the conditional and unconditional halves of classifier-free guidance on
two ranks, applied from outside the model.

A CFG sampler (:meth:`mugv.diffusion.RectifiedFlow.sample`) calls the DiT once per step on the
batch ``[cond; uncond]`` of ``2B`` samples and combines the two velocities as
``v = v_uncond + s (v_cond - v_uncond)`` (Ho & Salimans 2022, arXiv 2207.12598). With
:func:`apply_cfg_parallel` the two ranks of a ``"cfg"`` mesh dim each run one half::

    x, timestep, y, mask, x_mask, fps [2B, ...]  --rank r keeps rows [r*B, (r+1)*B)-->  DiT  -->
    out [B, ...]  --all_gather (dim 0, group order: cond, uncond)-->  out [2B, ...]

so the sampler sees the output of the whole batch, the same on both ranks, and combines it
unchanged: the latents of every step are identical on both ranks. A forward pre-hook (with
keyword arguments) slices every tensor argument whose leading dim is ``2B`` (the per-sample
ones); tensors with another leading dim (a shared ``[1]`` fps, for example) pass unchanged. A
forward hook gathers the output with ``torch.distributed._functional_collectives.all_gather_single``
(no autograd: sampling runs under ``no_grad``). The model knows nothing of it; it composes with
Ulysses context parallelism (:mod:`mugv.train.context_parallel`) on an orthogonal ``"cp"`` dim,
which then shards each half's packed sequence.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol

__all__ = ["CFGParallel", "apply_cfg_parallel"]


class CFGParallel:
    """The hooks :func:`apply_cfg_parallel` registers on the model.

    Attributes:
        group: the 1-D ``"cfg"`` ``DeviceMesh`` (2 ranks); ``rank``: this rank's place in it
            (0 runs the conditional half, 1 the unconditional one).
        handles: the hook handles (``remove()`` undoes the wrapping).
    """

    def __init__(self, group, rank: int) -> None:
        self.group, self.rank = group, rank
        self.handles: list = []

    def _half(self, v: Any, batch: int) -> Any:
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            h = batch // 2
            return v[self.rank * h:(self.rank + 1) * h]
        return v

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``model(x [2B, ...], ...)`` -> the same call on this rank's half ``[B, ...]``.

        Raises:
            ValueError: the batch is odd (no ``(cond, uncond)`` pair: CFG is off, guidance scale 1).
        """
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError("cfg-parallel: the model's first argument must be the latent batch x [2B, ...]")
        batch = x.shape[0]
        if batch % 2:
            raise ValueError(f"cfg-parallel splits the (cond, uncond) CFG batch across 2 ranks: got a batch of {batch} "
                             "(classifier-free guidance is off, e.g. a guidance scale of 1)")
        return tuple(self._half(a, batch) for a in args), {k: self._half(v, batch) for k, v in kwargs.items()}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        """The half's output ``[B, ...]`` -> the whole batch's ``[2B, ...]`` (cond first)."""
        full = funcol.all_gather_single(out.contiguous(), 0, self.group)
        return full.wait() if isinstance(full, funcol.AsyncCollectiveTensor) else full

    def remove(self) -> None:
        """Unregister the hooks (the model runs the whole batch again)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def apply_cfg_parallel(model: nn.Module, cfg_mesh) -> CFGParallel:
    """Run the two CFG halves of every ``model(...)`` call on the two ranks of ``cfg_mesh``.

    Args:
        model: any ``nn.Module`` whose forward takes the latent batch ``x [2B, ...]`` first
            (positionally or as ``x=``) and returns ``[2B, ...]`` (:class:`~mugv.models.MUGDiT`).
        cfg_mesh: a 1-D ``DeviceMesh`` of size 2 (the ``"cfg"`` dim of
            :func:`mugv.train.parallelize.build_sampling_mesh`).

    Returns:
        The :class:`CFGParallel` holding the hooks (``.remove()`` undoes them).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the mesh does not have 2 ranks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_cfg_parallel: expected an nn.Module, got {type(model).__name__}")
    if cfg_mesh.size() != 2:
        raise ValueError(f"cfg-parallel runs the cond and uncond halves on 2 ranks, got a mesh of {cfg_mesh.size()}")
    state = CFGParallel(cfg_mesh, cfg_mesh.get_local_rank())
    state.handles.append(model.register_forward_pre_hook(state.pre_hook, with_kwargs=True))
    state.handles.append(model.register_forward_hook(state.hook, with_kwargs=True))
    return state
