"""Parallelism for the DiT, kept apart from the model (the torchtitan layout:
``torchtitan/models/flux/parallelize.py``): the model only exposes ``model.blocks``.

:func:`parallelize_dit` applies, in this order,

1. activation checkpointing per block (``checkpoint_wrapper``, non-reentrant),
2. ``torch.compile`` per block (optional; in place, so parameter names do not change),
3. FSDP2 ``fully_shard`` per block and at the root, with
   ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` (bf16 compute, fp32 gradient reduce
   by default on GPUs; fp32 params on CPU/gloo, where bf16 matmuls are slow).

Also here: process-group setup from ``torchrun``'s environment (:func:`init_distributed`)
and model construction on the meta device or fully (:func:`build_model`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from mugv.config import ConfigError, pick_device

__all__ = ["DistInfo", "build_model", "init_distributed", "parallelize_dit", "resolve_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 elsewhere; else the named dtype.

    Raises:
        ConfigError: an unknown name.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected auto | bfloat16 | float32 | float16")
    return _DTYPES[name]


@dataclass(frozen=True)
class DistInfo:
    """The process's place in the job: global ``rank``, ``world_size``, ``local_rank``, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes (``RANK``/``WORLD_SIZE``/...), if any.

    NCCL on CUDA, gloo on CPU. Without ``WORLD_SIZE`` (or with 1) no group is created and
    the run is single-process. Idempotent.

    Args:
        device: ``auto`` (CUDA when available) | ``cpu`` | ``cuda``
            (:func:`mugv.config.pick_device`; on CUDA the device is ``LOCAL_RANK``'s).

    Raises:
        ConfigError: an unknown device, or ``cuda`` without a GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return DistInfo(rank, world, local_rank, dev)


def build_model(
    factory: Callable[[], nn.Module],
    *,
    device: torch.device,
    on_meta: bool,
    seed: int,
    parallelize: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Construct, parallelize and initialize a model (the ``init_weights()`` protocol).

    ``on_meta=True`` (large models): build on the meta device, parallelize (so each rank
    owns only its shards), ``to_empty(device)``, then ``init_weights()`` on the shards, so
    the full model never exists on one rank. ``on_meta=False`` (small models, and whenever
    runs of different world sizes must start from the same weights): build and initialize
    the full model on every rank with the same seed, then parallelize, which shards the
    existing values. Either way the result lives on ``device``.
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = factory()
    if on_meta:
        if parallelize is not None:
            model = parallelize(model)
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
        return model
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    model.to(device)
    if parallelize is not None:
        model = parallelize(model)
    return model


def parallelize_dit(
    model: nn.Module,
    *,
    fsdp: bool,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    compile: bool = False,
    mesh=None,
    reshard_after_forward: bool = True,
    forward_methods: tuple[str, ...] = ("forward_packed",),
    compile_backend: str = "inductor",
) -> nn.Module:
    """Apply activation checkpointing, per-block compile and FSDP2 to a model with ``.blocks``.

    Args:
        model: a model whose ``blocks`` attribute is an ``nn.ModuleList`` of DiT blocks.
        fsdp: shard with ``fully_shard`` (needs an initialized process group).
        param_dtype: FSDP2 compute dtype of the unsharded parameters (master weights stay fp32).
        reduce_dtype: dtype of the gradient reduce-scatter.
        activation_checkpointing: recompute each block's activations in the backward pass.
        compile: ``torch.compile`` each block (in place).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` in tests).
        mesh: a 1-D ``DeviceMesh`` (default: the whole world).
        reshard_after_forward: free unsharded block parameters after the forward (ZeRO-3);
            the root is never resharded (it is used again right away in the backward).
        forward_methods: methods of the root other than ``forward`` that run the model
            (``MUGDiT.forward_packed``); registered with ``register_fsdp_forward_method``.

    Returns:
        The same ``model`` object, modified in place.

    Raises:
        TypeError: ``model.blocks`` is not an ``nn.ModuleList``.
        RuntimeError: ``fsdp=True`` without an initialized process group.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"parallelize_dit: expected model.blocks to be an nn.ModuleList, got {type(blocks).__name__}")
    if activation_checkpointing:
        for i, blk in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)
    if compile:
        for blk in blocks:
            blk.compile(backend=compile_backend)
    if fsdp:
        if not dist.is_initialized():
            raise RuntimeError("parallelize_dit: fsdp=True needs torch.distributed initialized (run under torchrun)")

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for blk in blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        for name in forward_methods:  # entry points other than forward() need FSDP's hooks too
            if hasattr(model, name):
                register_fsdp_forward_method(model, name)
    return model
