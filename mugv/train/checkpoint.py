"""The run state of a training run with ``torch.distributed.checkpoint`` (DCP): sharded,
atomic, rotated. (Model weights alone, in the public formats, are
:func:`mugv.models.load_checkpoint` / :func:`mugv.models.save_checkpoint`.)

A run-state checkpoint is a directory ``<run>/checkpoints/step_<NNNNNNNN>/`` holding

* the DCP files of ``{"model": ..., "optim": ..., "ema": ...}`` (each rank writes its
  shards; ``get_state_dict`` gives FSDP2 DTensors, so any world size can load them back),
* ``extra_rank<R>.pt`` per rank: the step, the sampler state, RNG states and the
  recorded losses (``torch.save``; small, per-rank because RNG states differ by rank).

* ``MANIFEST.json``: the size and SHA-256 of every other file, then ``COMPLETE``: the
  completion marker. Both are written last (each file fsynced), so a checkpoint is *valid*
  only if the marker exists and every file listed matches its size and checksum.

It is written to ``step_<N>.tmp`` and renamed by rank 0 after a barrier, so a crash never
leaves a directory that looks complete; incomplete ``*.tmp`` directories are ignored and
cleaned up. :func:`latest_checkpoint` verifies checkpoints newest first and skips (with a
warning naming it) an incomplete or corrupt one (truncated file, flipped bytes, missing
file). A failed write (``ENOSPC``, ``EIO``, ...) removes the partial directory, leaves the
earlier checkpoints intact and raises :class:`CheckpointWriteError`. Rotation keeps the newest
``keep_last`` valid checkpoints and never deletes the newest valid one; a checkpoint being
deleted loses its marker first, so a crash mid-rotation never leaves a half-deleted directory
that looks valid. On several nodes the run directory must be on a shared filesystem (as for
any DCP checkpoint).

Without an initialized process group every call works single-process (DCP's no-dist mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

__all__ = ["CheckpointError", "CheckpointWriteError", "checkpoint_dirs", "fault_point", "latest_checkpoint",
    "load_ema_weights", "load_run_state", "rng_state", "save_run_state", "set_rng_state", "verify_checkpoint"]

_STEP = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
FAULT_ENV = "MUGV_FAULT_INJECT"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt, or a run has checkpoints but none is valid."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error); the earlier checkpoints are intact."""


def fault_point(name: str, step: int) -> None:
    """Test hook: SIGKILL this process at fault point ``name`` of ``step`` when the environment
    variable ``MUGV_FAULT_INJECT`` is ``"<name>@<step>"`` or ``"<name>@<step>@<rank>"`` (that
    rank only, and only in the first attempt of a torchrun job: ``TORCHELASTIC_RESTART_COUNT``
    unset or 0). Points: ``step`` in the middle of a training step, ``checkpoint_write``
    between the shard files and the marker, ``rotation`` in the middle of deleting an old
    checkpoint. A no-op otherwise."""
    parts = os.environ.get(FAULT_ENV, "").split("@")
    if len(parts) < 2 or parts[0] != name or parts[1] != str(step):
        return
    if len(parts) > 2 and (parts[2] != str(_rank()) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: where the OS allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _finalize(tmp: Path, step: int) -> None:
    """Write the manifest (size + SHA-256 of every file, each fsynced), then the marker."""
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync_path(f)
            files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    _write_durable(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1).encode())
    _write_durable(tmp / MARKER, f"{step}\n".encode())
    _fsync_path(tmp)


def _is_marked(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / MANIFEST).is_file()


def verify_checkpoint(path: str | Path) -> None:
    """Check that ``path`` is a valid checkpoint: marker and manifest present, and every file
    of the manifest present with its recorded size and SHA-256.

    Raises:
        CheckpointError: what is wrong (no marker, a missing, truncated or altered file).
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} marker "
                              "(the write was interrupted, or it predates completion markers)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} missing or unreadable ({e})") from None
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != rec["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"expected {rec['size']} (truncated?)")
        if _sha256(f) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its SHA-256 checksum")


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
    """The ``step_<N>`` checkpoint directories of a run (valid or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path, *, verify: bool = True, trust_unverified: bool = False) -> Path | None:
    """The newest valid checkpoint of a run, or None when the run has no checkpoint directory.

    Checkpoints are checked newest first (:func:`verify_checkpoint`; with ``verify=False`` only
    the marker); an invalid one is skipped with a warning naming it and why. Under a process
    group rank 0 checks and broadcasts its choice.

    A checkpoint with neither ``COMPLETE`` marker nor ``MANIFEST.json`` (one written before
    checkpoints carried them) cannot be verified and is refused like a torn one. With
    ``trust_unverified=True``, and only when no checkpoint is valid, the newest such unmarked
    checkpoint that has its DCP ``.metadata`` and ``extra_rank0.pt`` is returned instead, with a
    warning that its files were not checked.

    Raises:
        CheckpointError: the run has checkpoint directories but none is valid (never a silent
            fresh start over an existing run: move them away to start over); the message names
            each checkpoint and what it lacks, and points to ``trust_unverified`` (the
            ``--trust-unverified-checkpoint`` flag of ``mugv train``) where one is unmarked.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", _latest_valid(run_dir, verify, trust_unverified))
            except CheckpointError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        kind, val = box[0]
        if kind == "error":
            raise CheckpointError(val)
        return val
    return _latest_valid(run_dir, verify, trust_unverified)


def _unverifiable(d: Path) -> bool:
    """No marker and no manifest, but the files a load needs: a checkpoint written before
    checkpoints carried a completion marker (or a torn one: nothing tells them apart)."""
    return (not (d / MARKER).exists() and not (d / MANIFEST).exists()
            and (d / ".metadata").is_file() and (d / "extra_rank0.pt").is_file())


def _latest_valid(run_dir, verify: bool, trust_unverified: bool = False) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    bad = []
    for d in reversed(dirs):
        try:
            if verify:
                verify_checkpoint(d)
            elif not _is_marked(d):
                raise CheckpointError(f"checkpoint {d} is incomplete: no {MARKER} marker")
        except CheckpointError as e:
            warnings.warn(f"skipping {d}: {e}", RuntimeWarning, stacklevel=3)
            bad.append(d)
            continue
        return d
    if not bad:
        return None
    unmarked = [d for d in bad if _unverifiable(d)]
    if trust_unverified and unmarked:
        warnings.warn(
            f"resuming from the unverified checkpoint {unmarked[0]}: it has no {MARKER} marker and no {MANIFEST}, "
            "so a torn or corrupt write cannot be detected (trust_unverified_checkpoint is set)",
            RuntimeWarning, stacklevel=3)
        return unmarked[0]
    unmarked_why = (f"no {MARKER} marker and no {MANIFEST} (written before checkpoints carried them, "
                    "or its write was interrupted)")
    why = "; ".join(f"{d.name}: {unmarked_why if d in unmarked else 'incomplete or corrupt'}" for d in reversed(bad))
    hint = (f"; to resume from {unmarked[0]} anyway, unverified, pass --trust-unverified-checkpoint "
            "(trust_unverified_checkpoint = true)" if unmarked else "")
    raise CheckpointError(
        f"{Path(run_dir) / 'checkpoints'} holds checkpoints but none is valid ({why}); refusing to start a fresh "
        f"run over them: move them away (or choose a new output directory){hint}"
    )


def _rotate(run_dir: Path, keep_last: int, step: int) -> None:
    """Delete all but the newest ``keep_last`` valid (marked) checkpoints, and incomplete ones
    older than the newest valid. A directory being deleted loses its marker first."""
    dirs = checkpoint_dirs(run_dir)
    valid = [d for d in dirs if _is_marked(d)]
    if not valid:
        return
    keep = set(valid[-keep_last:])
    newest = valid[-1]
    for d in dirs:
        if d in keep or int(d.name[5:]) > int(newest.name[5:]):
            continue
        (d / MARKER).unlink(missing_ok=True)
        _fsync_path(d)
        fault_point("rotation", step)
        shutil.rmtree(d, ignore_errors=True)


_META_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                 ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only DCP's metadata records, ``torch.Size``,
    dtypes and paths: a pickle that names any other callable (``os.system``, ...) is refused."""

    def find_class(self, module, name):
        ok = (module, name) in _META_ALLOWED or module in (
            "torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"
        ) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check_dcp_metadata(path: Path) -> None:
    """Refuse a ``.metadata`` that would run code (DCP itself unpickles it without limits)."""
    try:
        with open(path / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no .metadata") from None
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: refusing its .metadata ({e})") from None


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but the non-tensor entries load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data; refusing it "
                                  f"({str(e).splitlines()[0]})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
        CheckpointWriteError: a write failed (``ENOSPC``, ``EIO``, ...): the partial directory
            is removed, the earlier checkpoints are untouched, and the run should stop.
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
    try:
        with _quiet_single_process():
            dcp.save(_dcp_state(model, optimizer, ema), checkpoint_id=str(tmp))
        buf = io.BytesIO()
        torch.save({"step": step, **(extra or {})}, buf)
        _write_durable(tmp / f"extra_rank{_rank()}.pt", buf.getvalue())
        failed = None
    except OSError as e:
        failed = e
    ok = _all_ok(failed is None)
    if ok:
        fault_point("checkpoint_write", step)
        if _rank() == 0:
            try:
                _finalize(tmp, step)
            except OSError as e:
                failed = e
        ok = _all_ok(failed is None)
    if not ok:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = [d.name for d in checkpoint_dirs(run_dir) if _is_marked(d)]
        why = f"{failed.strerror or failed}" if failed is not None else "failed on another rank"
        raise CheckpointWriteError(
            getattr(failed, "errno", None),
            f"checkpoint step_{step:08d} could not be written ({why}); the partial write was removed and "
            f"the earlier checkpoints are intact (newest: {prev[-1] if prev else 'none'}); stopping the run",
        ) from failed
    if _rank() == 0:
        if final.exists():
            (final / MARKER).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        _rotate(Path(run_dir), keep_last, step)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a MIN all-reduce under a process group)."""
    if not dist.is_initialized():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def load_run_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ema=None
) -> dict:
    """Load a checkpoint written by :func:`save_run_state` into the (sharded) objects.

    Returns this rank's ``extra`` dict (``step``, sampler and RNG states, ...).

    The per-rank file is read with ``torch.load(weights_only=True)``: tensors and plain
    containers only, a pickle that would run code is refused.

    Raises:
        FileNotFoundError: ``path`` has no ``extra_rank<R>.pt`` for this rank (a checkpoint of
            a smaller world size: resume with the same number of ranks).
        CheckpointError: the per-rank file holds anything but tensors and plain data.
    """
    path = Path(path)
    extra_file = path / f"extra_rank{_rank()}.pt"
    if not extra_file.exists():
        raise FileNotFoundError(f"load_run_state: {extra_file} missing; resume with the world size of the run")
    _check_dcp_metadata(path)
    state = _dcp_state(model, optimizer, ema)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), planner=_SafeLoadPlanner())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    try:
        return torch.load(extra_file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"load_run_state: {extra_file} holds objects other than tensors and plain data; "
                              f"refusing to unpickle it ({str(e).splitlines()[0]})") from None


def load_ema_weights(path: str | Path, model: nn.Module, use_ema: bool = True) -> None:
    """Load the EMA (or raw) weights of a checkpoint into a plain, unsharded ``model``.

    Works in a single process without a process group (DCP reshards to full tensors).
    Entries the EMA does not hold (or all, with ``use_ema=False``) come from the raw weights.

    Raises:
        KeyError: the checkpoint lacks some of the model's entries.
        CheckpointError: its ``.metadata`` or an entry would run code when unpickled.
    """
    path = Path(path)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    _check_dcp_metadata(path)
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
        dcp.load(state, checkpoint_id=str(path), planner=_SafeLoadPlanner())
    model.load_state_dict({**state.get("model", {}), **state.get("ema", {})}, strict=True)
