"""Parallelism for the DiT, kept apart from the model (the torchtitan layout:
``torchtitan/models/flux/parallelize.py``): the model only exposes ``model.blocks``.

:func:`parallelize_dit` applies, in this order,

1. activation checkpointing per block (``checkpoint_wrapper``, non-reentrant): ``full``
   recomputes the whole block, ``selective`` recomputes only the cheap ops (the op-level
   selective-checkpoint policy of torchtitan, :func:`selective_checkpoint_policy`),
2. ``torch.compile`` per block (optional; in place, so parameter names do not change),
3. Ulysses context parallelism over the mesh's ``"cp"`` dim: hooks on the (wrapped) blocks
   and the final layer, and the attention call of the packed batch
   (:mod:`mugv.train.context_parallel`); the sharding of the first block's input is outside
   the checkpointed region, the all-to-alls inside it,
4. FSDP2 ``fully_shard`` per block and at the root, with
   ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` (bf16 compute, fp32 gradient reduce
   by default on GPUs; fp32 params on CPU/gloo, where bf16 matmuls are slow).

Also here: process-group setup from ``torchrun``'s environment (:func:`init_distributed`), the
``("dp_replicate", "dp_shard", "cp")`` device mesh (:func:`build_mesh`, as torchtitan's
``ParallelDims``), model construction on the meta device or fully (:func:`build_model`), and
parallel sampling (:func:`parallelize_for_sampling`: Ulysses over ``"cp"`` and the two CFG
halves over ``"cfg"`` of a ``("cfg", "cp")`` mesh, :func:`build_sampling_mesh`).

The mesh: ``world = dp_replicate * dp_shard * cp``. FSDP2 shards parameters over ``dp_shard``
and ``cp`` flattened (``"dp_shard_cp"``): the ranks of a context-parallel group hold different
parameter shards too. With ``dp_replicate > 1`` it is HSDP: replicated across the
``dp_replicate`` groups (nodes), sharded within. Data parallelism (the sampler's replicas) is
``dp_replicate * dp_shard``; the ranks of one cp group read the same micro-batch.
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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mugv.config import ConfigError, pick_device

__all__ = ["AC_MODES", "DistInfo", "ParallelDims", "SamplingParallel", "build_mesh", "build_sampling_mesh", "fsdp_mesh",
           "build_model", "init_distributed", "parallelize_dit", "parallelize_for_sampling", "resolve_dtype",
           "selective_checkpoint_policy"]

#: Values of ``--activation-checkpointing``.
AC_MODES = ("none", "full", "selective")

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


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of the ``("dp_replicate", "dp_shard", "cp")`` mesh (``world = product``).

    Attributes:
        dp_replicate: HSDP replica groups (1 = plain FSDP).
        dp_shard: FSDP shard degree of the data-parallel part.
        cp: Ulysses context-parallel degree (ranks sharing one micro-batch).
    """

    dp_replicate: int
    dp_shard: int
    cp: int

    @classmethod
    def from_world(cls, world_size: int, *, dp_replicate: int = 1, cp: int = 1) -> ParallelDims:
        """``dp_shard = world_size / (dp_replicate * cp)``.

        Raises:
            ConfigError: a degree below 1, or ``dp_replicate * cp`` not dividing ``world_size``.
        """
        if dp_replicate < 1 or cp < 1:
            raise ConfigError(f"dp_replicate and context_parallel must be >= 1, got {dp_replicate} and {cp}")
        if world_size % (dp_replicate * cp):
            raise ConfigError(
                f"world size {world_size} is not divisible by dp_replicate * context_parallel = {dp_replicate} * {cp}"
            )
        return cls(dp_replicate, world_size // (dp_replicate * cp), cp)

    @property
    def dp(self) -> int:
        """Data-parallel degree: micro-batches per step (``dp_replicate * dp_shard``)."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """The micro-batch a global ``rank`` reads (ranks of one cp group are contiguous)."""
        return rank // self.cp


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The ``("dp_replicate", "dp_shard", "cp")`` ``DeviceMesh`` (``cp`` innermost, so a cp
    group is ``cp`` consecutive ranks, on one node), with the flattened ``"dp_shard_cp"``
    dim that FSDP2 shards over. Needs an initialized process group of ``dims`` ranks."""
    mesh = init_device_mesh(
        device_type, (dims.dp_replicate, dims.dp_shard, dims.cp), mesh_dim_names=("dp_replicate", "dp_shard", "cp")
    )
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 uses: ``"dp_shard_cp"``, or ``("dp_replicate", "dp_shard_cp")`` (HSDP).

    Built from ``mesh`` (:func:`build_mesh`) without slicing a flattened dim out of the root
    mesh (deprecated in PyTorch): the flattened ``dp_shard x cp`` mesh is the one ``_flatten``
    returns (created once, then reused), and the HSDP mesh unflattens the whole world into
    ``(dp_replicate, dp_shard * cp)`` (torchtitan's ``ParallelDims.build_mesh`` builds its
    meshes by ``_unflatten`` of the world mesh too). The HSDP case creates its process groups
    on each call: call it once per model, on every rank."""
    shard_cp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    replicate = mesh["dp_replicate"].size()
    if replicate == 1:
        return shard_cp
    return mesh._flatten("world")._unflatten(0, (replicate, shard_cp.size()), ("dp_replicate", "dp_shard_cp"))


def build_sampling_mesh(world_size: int, *, context_parallel: int = 1, cfg_parallel: bool = False,
                        device_type: str = "cpu") -> DeviceMesh:
    """The ``("cfg", "cp")`` ``DeviceMesh`` of parallel sampling (``cp`` innermost).

    ``"cfg"`` has 2 ranks with ``cfg_parallel`` (rank 0 of it runs the conditional half of
    classifier-free guidance, rank 1 the unconditional one), else 1; ``"cp"`` has
    ``context_parallel`` ranks sharing each half's sequence. Needs an initialized process group
    of exactly ``world_size = (2 if cfg_parallel else 1) * context_parallel`` ranks (sampling
    has no data parallelism: every rank works on the one clip).

    Raises:
        ConfigError: ``context_parallel < 1``, or a world size that is not that product.
    """
    if context_parallel < 1:
        raise ConfigError(f"--context-parallel must be >= 1, got {context_parallel}")
    cfg = 2 if cfg_parallel else 1
    if world_size != cfg * context_parallel:
        what = f"--context-parallel {context_parallel}" + (" x --cfg-parallel (2)" if cfg_parallel else "")
        raise ConfigError(f"parallel sampling runs {what} = {cfg * context_parallel} ranks, but the world size is "
                          f"{world_size}: launch torchrun --nproc-per-node {cfg * context_parallel} (or change the flags)")
    return init_device_mesh(device_type, (cfg, context_parallel), mesh_dim_names=("cfg", "cp"))


@dataclass
class SamplingParallel:
    """What :func:`parallelize_for_sampling` attached to a DiT.

    Attributes:
        mesh: the ``("cfg", "cp")`` mesh (:func:`build_sampling_mesh`).
        context_parallel: the Ulysses hooks (``None`` when ``cp == 1``).
        cfg_parallel: the CFG-split hooks (``None`` without ``cfg_parallel``).
    """

    mesh: DeviceMesh
    context_parallel: object = None
    cfg_parallel: object = None

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the outputs (global rank 0)."""
        return dist.get_rank() == 0

    def remove(self) -> None:
        """Unregister every hook (the model samples in one process again)."""
        for state in (self.context_parallel, self.cfg_parallel):
            if state is not None:
                state.remove()


def parallelize_for_sampling(model: nn.Module, *, context_parallel: int = 1, cfg_parallel: bool = False,
                             device_type: str = "cpu") -> SamplingParallel:
    """Shard sampling of ``model`` (a :class:`~mugv.models.MUGDiT`) over the ranks of the job.

    Ulysses context parallelism over the ``"cp"`` dim (:func:`~mugv.train.context_parallel.apply_context_parallel`:
    each rank holds ``1/cp`` of the packed tokens of the CFG batch, or of its half) and, with
    ``cfg_parallel``, the cond/uncond split over the ``"cfg"`` dim
    (:func:`~mugv.train.cfg_parallel.apply_cfg_parallel`). Both are hooks: the model is
    unchanged, every rank ends each model call with the whole output, so all ranks step the
    same latents.

    Args:
        model: the DiT (``blocks``, ``final_layer``, ``cfg.num_heads``).
        context_parallel: ``cp`` (1: none); must divide ``num_heads``.
        cfg_parallel: split the CFG batch over 2 ranks (needs guidance scale != 1).
        device_type: ``"cuda"`` or ``"cpu"`` (gloo) for the mesh.

    Returns:
        The :class:`SamplingParallel` (``.remove()`` undoes it).

    Raises:
        ConfigError: no process group, or a world size that is not ``(2 if cfg_parallel else 1) * cp``.
        ValueError: ``num_heads`` not divisible by ``cp``.
    """
    from mugv.train.cfg_parallel import apply_cfg_parallel
    from mugv.train.context_parallel import apply_context_parallel, check_cp_heads

    if context_parallel < 1:
        raise ConfigError(f"--context-parallel must be >= 1, got {context_parallel}")
    if not dist.is_initialized():
        raise ConfigError("--context-parallel / --cfg-parallel need torch.distributed: launch with torchrun "
                          f"--nproc-per-node {(2 if cfg_parallel else 1) * context_parallel}")
    heads = getattr(getattr(model, "cfg", None), "num_heads", None)
    if heads is not None:
        check_cp_heads(heads, context_parallel)
    mesh = build_sampling_mesh(dist.get_world_size(), context_parallel=context_parallel, cfg_parallel=cfg_parallel,
                               device_type=device_type)
    out = SamplingParallel(mesh)
    if context_parallel > 1:
        out.context_parallel = apply_context_parallel(model, mesh["cp"])
    if cfg_parallel:
        out.cfg_parallel = apply_cfg_parallel(model, mesh["cfg"])
    return out


#: ATen ops whose outputs ``selective`` activation checkpointing keeps: the matmuls and the
#: attention kernels (expensive to recompute), and the all-to-alls of context parallelism (so
#: the recompute does not communicate). Everything else (norms, adaLN modulation, RoPE, GELU,
#: residuals, views) is recomputed in the backward pass.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._flash_attention_forward.default,
    torch.ops.aten._efficient_attention_forward.default,
    torch.ops._c10d_functional.all_to_all_single.default,
}


def _is_saved_op(func) -> bool:
    if func in _SAVE_OPS:
        return True
    name = str(func)  # e.g. "mugv.varlen_attention_fwd.default": our fused attention kernels
    return name.startswith("mugv.") and "attention" in name and "bwd" not in name


def selective_checkpoint_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Op-level selective activation checkpointing policy (torchtitan's SAC, for
    ``torch.utils.checkpoint.create_selective_checkpoint_contexts``): ``MUST_SAVE`` the outputs
    of matmuls, attention and the context-parallel all-to-alls, ``PREFER_RECOMPUTE`` the rest.
    The decision depends on ``func`` (an ATen or ``mugv`` op overload) alone; ``ctx`` and the
    arguments are not read, so ``selective_checkpoint_policy(None, func)`` asks it for one op."""
    return CheckpointPolicy.MUST_SAVE if _is_saved_op(func) else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_context():
    return create_selective_checkpoint_contexts(selective_checkpoint_policy)


def _ac_mode(value) -> str:
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in AC_MODES:
        raise ConfigError(f"activation_checkpointing must be {' | '.join(AC_MODES)}, got {value!r}")
    return value


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
    activation_checkpointing: bool | str = "none",
    compile: bool = False,
    mesh=None,
    cp_mesh=None,
    reshard_after_forward: bool = True,
    forward_methods: tuple[str, ...] = ("forward_packed",),
    compile_backend: str = "inductor",
) -> nn.Module:
    """Apply context parallelism, activation checkpointing, per-block compile and FSDP2 to a
    model with ``.blocks``.

    Args:
        model: a model whose ``blocks`` attribute is an ``nn.ModuleList`` of DiT blocks.
        fsdp: shard with ``fully_shard`` (needs an initialized process group).
        param_dtype: FSDP2 compute dtype of the unsharded parameters (master weights stay fp32).
        reduce_dtype: dtype of the gradient reduce-scatter.
        activation_checkpointing: ``"none"``, ``"full"`` (recompute each block in the
            backward pass; True means this) or ``"selective"`` (keep matmul, attention and
            all-to-all outputs, recompute the rest: :func:`selective_checkpoint_policy`).
        compile: ``torch.compile`` each block (in place).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` in tests).
        mesh: the FSDP ``DeviceMesh``: 1-D, or 2-D ``(replicate, shard)`` for HSDP
            (:func:`fsdp_mesh`; default: the whole world).
        cp_mesh: a 1-D ``DeviceMesh`` of the context-parallel group (the ``"cp"`` dim of
            :func:`build_mesh`); None or size 1: no context parallelism.
        reshard_after_forward: free unsharded block parameters after the forward (ZeRO-3);
            the root is never resharded (it is used again right away in the backward).
        forward_methods: methods of the root other than ``forward`` that run the model
            (``MUGDiT.forward_packed``); registered with ``register_fsdp_forward_method``.

    Returns:
        The same ``model`` object, modified in place.

    Raises:
        TypeError: ``model.blocks`` is not an ``nn.ModuleList``.
        ValueError: ``num_heads`` not divisible by the ``cp_mesh`` size.
        ConfigError: an unknown ``activation_checkpointing`` mode.
        RuntimeError: ``fsdp=True`` without an initialized process group.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"parallelize_dit: expected model.blocks to be an nn.ModuleList, got {type(blocks).__name__}")
    ac = _ac_mode(activation_checkpointing)
    if ac != "none":
        extra = {"context_fn": _sac_context} if ac == "selective" else {}
        for i, blk in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False, **extra)
    if compile:
        for blk in blocks:
            blk.compile(backend=compile_backend)
    if cp_mesh is not None and cp_mesh.size() > 1:
        from mugv.train.context_parallel import apply_context_parallel

        model._context_parallel = apply_context_parallel(model, cp_mesh)
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
