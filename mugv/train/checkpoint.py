"""The run state of a training run with ``torch.distributed.checkpoint`` (DCP): sharded,
atomic, rotated. (Model weights alone, in the public formats, are
:func:`mugv.models.load_checkpoint` / :func:`mugv.models.save_checkpoint`.)

A run-state checkpoint is a directory ``<run>/checkpoints/step_<NNNNNNNN>/`` holding

* the DCP files of ``{"model": ..., "optim": ..., "ema": ...}`` (each rank writes its
  shards; ``get_state_dict`` gives FSDP2 DTensors, so any world size can load them back),
* ``extra_rank<R>.pt`` per rank: the step, the sampler state, RNG states and the
  recorded losses (``torch.save``; small, per-rank because RNG states differ by rank).

It is written to ``step_<N>.tmp`` and renamed by rank 0 after a barrier, so a crash never
leaves a directory that looks complete; incomplete ``*.tmp`` directories are ignored and
cleaned up. Only the newest ``keep_last`` checkpoints are kept. On several nodes the run
directory must be on a shared filesystem (as for any DCP checkpoint).

Without an initialized process group every call works single-process (DCP's no-dist mode).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_ema_weights", "load_run_state", "rng_state",
    "save_run_state", "set_rng_state"]

_STEP = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when no group exists: that is our intent."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """The Python, torch CPU and (if any) CUDA generator states."""
    out = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ema) -> dict:
    """``{"model", "optim" (if an optimizer), "ema" (if an EMA)}`` state dicts in DCP form
    (FSDP2 DTensors stay sharded)."""
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_run_state(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema=None,
    extra: dict | None = None,
    keep_last: int = 3,
) -> Path:
    """Save model, optimizer, EMA (DCP) and ``extra`` (per rank) for ``step``, atomically.

    Collective: every rank must call it. Returns the final checkpoint directory.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if keep_last < 1:
        raise ValueError(f"save_run_state: keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(_dcp_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save({"step": step, **(extra or {})}, tmp / f"extra_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_run_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ema=None
) -> dict:
    """Load a checkpoint written by :func:`save_run_state` into the (sharded) objects.

    Returns this rank's ``extra`` dict (``step``, sampler and RNG states, ...).

    Raises:
        FileNotFoundError: ``path`` has no ``extra_rank<R>.pt`` for this rank (a checkpoint of
            a smaller world size: resume with the same number of ranks).
    """
    path = Path(path)
    extra_file = path / f"extra_rank{_rank()}.pt"
    if not extra_file.exists():
        raise FileNotFoundError(f"load_run_state: {extra_file} missing; resume with the world size of the run")
    state = _dcp_state(model, optimizer, ema)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return torch.load(extra_file, weights_only=False)


def load_ema_weights(path: str | Path, model: nn.Module, use_ema: bool = True) -> None:
    """Load the EMA (or raw) weights of a checkpoint into a plain, unsharded ``model``.

    Works in a single process without a process group (DCP reshards to full tensors).
    Entries the EMA does not hold (or all, with ``use_ema=False``) come from the raw weights.

    Raises:
        KeyError: the checkpoint lacks some of the model's entries.
    """
    path = Path(path)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    stored = set(meta.state_dict_metadata)
    # EMA covers the trainable parameters; anything else (buffers, frozen weights) comes from "model".
    src = {k: ("ema" if use_ema and f"ema.{k}" in stored else "model") for k in sd}
    missing = [k for k, s in src.items() if f"{s}.{k}" not in stored]
    if missing:
        raise KeyError(f"load_ema_weights: {path} lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    state = {"ema": {k: sd[k] for k, s in src.items() if s == "ema"},
             "model": {k: sd[k] for k, s in src.items() if s == "model"}}
    state = {k: v for k, v in state.items() if v}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict({**state.get("model", {}), **state.get("ema", {})}, strict=True)
