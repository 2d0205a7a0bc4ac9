"""Weights of a run's checkpoint, one tensor at a time, and weights-only runs.

The tools that rewrite weights (:mod:`mugv.train.hypercloning`, :mod:`mugv.train.merge`)
and ``--init-from`` read a checkpoint of ``mugv train`` (a DCP directory
``<run>/checkpoints/step_<N>/``, see :mod:`mugv.train.checkpoint`) through
:func:`read_tensor`, which asks DCP for a single entry, so no tool needs the whole run state
(optimizer moments included) in memory. They write a *weights-only run*: a directory with
``config.json`` (the source run's, with the new ``dit`` fields) and
``checkpoints/step_00000000/`` holding ``{"model": ..., "ema": ...}`` (both the same tensors)
and no optimizer, which ``mugv train --init-from DIR``, ``mugv generate --checkpoint DIR``
and the tools themselves accept.

Single process (DCP's no-dist mode): the tools run on one host, before or after training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from mugv.config import ConfigError
from mugv.models import DiTConfig
from mugv.train.checkpoint import latest_checkpoint, save_run_state, verify_checkpoint

__all__ = ["checkpoint_keys", "dit_config_of", "init_config", "load_weights", "read_run_config", "read_tensor",
           "resolve_step_dir", "write_weights_run"]

_STEP_ARG = re.compile(r"^step_?(\d+)$")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def resolve_step_dir(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(run_dir, step_dir)`` of a checkpoint named by ``path``.

    Accepted: a run directory (its newest checkpoint), ``<run>/checkpoints/step_<N>``, or
    the short ``<run>/step_<N>`` / ``<run>/step<N>`` (``N`` without the zero padding).

    Raises:
        FileNotFoundError: nothing of that kind at ``path``, or a run without checkpoints.
        CheckpointError: the named checkpoint is incomplete or corrupt (a run directory gives
            its newest valid one).
    """
    p = Path(path)
    if (p / ".metadata").exists() and (p.parent.parent / "config.json").exists():
        verify_checkpoint(p)
        return p.parent.parent, p
    if (p / "config.json").exists():
        step = latest_checkpoint(p)
        if step is None:
            raise FileNotFoundError(f"{p}: the run has no checkpoint yet")
        return p, step
    m = _STEP_ARG.match(p.name)
    if m and (p.parent / "config.json").exists():
        step = p.parent / "checkpoints" / f"step_{int(m.group(1)):08d}"
        if (step / ".metadata").exists():
            verify_checkpoint(step)
            return p.parent, step
        raise FileNotFoundError(f"{p}: no checkpoint {step}")
    raise FileNotFoundError(f"{p}: expected a run directory (with config.json), <run>/checkpoints/step_N or <run>/step_N")


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The run's ``config.json`` (``train``, ``dit``, ``data``, ``vae``, ... ) as a dict.

    Raises:
        FileNotFoundError: no ``config.json``. ValueError: it has no ``dit`` table.
    """
    f = Path(run_dir) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: missing (not a run directory of mugv train)")
    info = json.loads(f.read_text())
    if "dit" not in info:
        raise ValueError(f"{f}: has no 'dit' table; not a DiT run")
    return info


def dit_config_of(info: dict) -> DiTConfig:
    """The :class:`~mugv.models.DiTConfig` recorded in a run's ``config.json`` dict."""
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    return DiTConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in info["dit"].items() if k in names})


def init_config(cfg, data_fields: dict) -> tuple[DiTConfig, Path]:
    """``(dit_config, step_dir)`` for ``TrainConfig.init_from``: the DiT shape of the source
    run, checked against the data (``in_channels``, ``text_dim``) and against any
    ``depth``/``hidden_size``/``num_heads`` set in ``cfg``.

    Raises:
        FileNotFoundError: no such run or checkpoint. ConfigError: a shape that disagrees.
    """
    run_dir, step_dir = resolve_step_dir(cfg.init_from)
    dit = dit_config_of(read_run_config(run_dir))
    for k, v in data_fields.items():
        if getattr(dit, k) != v:
            why = "the data" if k in ("in_channels", "text_dim") else "this config"
            raise ConfigError(f"init_from {cfg.init_from}: its DiT has {k}={getattr(dit, k)}, {why} has {v}")
    return dit, step_dir


def load_weights(step_dir: str | os.PathLike, model: nn.Module, source: str = "model") -> None:
    """Load a checkpoint's weights into ``model`` (plain or FSDP2-sharded; collective under a
    process group: DCP reads each rank's shards). ``source="ema"`` takes the EMA where it
    holds an entry (else the raw weights).

    Raises:
        KeyError: the checkpoint lacks some of the model's entries. ValueError: a shape differs.
    """
    sd = get_model_state_dict(model)
    keys = checkpoint_keys(step_dir, source)
    missing = sorted(set(sd) - set(keys))
    if missing:
        raise KeyError(f"{step_dir}: lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(keys[k][1]):
            raise ValueError(f"{step_dir}: {k} has shape {tuple(keys[k][1])}, the model {tuple(v.shape)}")
    state: dict = {}
    for k, v in sd.items():
        prefix = keys[k][0].split(".", 1)[0]
        state.setdefault(prefix, {})[k] = v
    ctx = _quiet() if not dist.is_initialized() else contextlib.nullcontext()
    with ctx:
        dcp.load(state, checkpoint_id=str(step_dir))
    set_model_state_dict(model, {k: v for part in state.values() for k, v in part.items()})


def checkpoint_keys(step_dir: str | os.PathLike, source: str = "ema") -> dict[str, tuple[str, torch.Size, torch.dtype]]:
    """Weight name -> ``(stored_as, shape, dtype)`` of a checkpoint's model weights.

    Args:
        step_dir: a DCP checkpoint directory.
        source: ``"ema"``: the EMA where it holds the entry, else the raw weights (as
            :func:`mugv.train.checkpoint.load_ema_weights`); ``"model"``: the raw weights.
            ``stored_as`` is the DCP key (``"ema.<name>"`` or ``"model.<name>"``).

    Raises:
        ValueError: an unknown ``source``; a checkpoint without model weights.
    """
    if source not in ("ema", "model"):
        raise ValueError(f"source must be 'ema' or 'model', got {source!r}")
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    out = {}
    for key, md in meta.items():
        if key.startswith("model.") and hasattr(md, "size"):
            name = key[len("model."):]
            ema = f"ema.{name}"
            chosen = ema if source == "ema" and ema in meta else key
            m = meta[chosen]
            out[name] = (chosen, torch.Size(m.size), m.properties.dtype)
    if not out:
        raise ValueError(f"{step_dir}: no model weights in this checkpoint")
    return out


def read_tensor(step_dir: str | os.PathLike, stored_as: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """One entry of a DCP checkpoint (e.g. ``"ema.blocks.0.attn.qkv.weight"``) as a CPU tensor."""
    prefix, name = stored_as.split(".", 1)
    buf = torch.empty(shape, dtype=dtype)
    with _quiet():
        dcp.load({prefix: {name: buf}}, checkpoint_id=str(step_dir))
    return buf


class _FixedState:
    """The ``state_dict()`` an EMA would give (what :func:`save_run_state` stores as ``ema``)."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def write_weights_run(out: str | os.PathLike, state: Mapping[str, torch.Tensor], run_config: dict,
                      extra: dict | None = None) -> Path:
    """Write a weights-only run (see the module docstring): ``out/config.json`` and
    ``out/checkpoints/step_00000000`` with ``state`` as both ``model`` and ``ema``.

    Written with :func:`mugv.train.checkpoint.save_run_state` (manifest and completion marker),
    so it is a valid checkpoint for every reader. Returns the checkpoint directory.

    Raises:
        FileExistsError: ``out`` already holds checkpoints (never overwritten).
        RuntimeError: ``state`` does not match the DiT of ``run_config["dit"]`` (keys or shapes).
    """
    out = Path(out)
    root = out / "checkpoints"
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{out}: already holds checkpoints; choose a new --out directory")
    from mugv.models import MUGDiT

    with torch.device("meta"):
        model = MUGDiT(dit_config_of(run_config), kernels=False)
    model.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True, assign=True)
    ema = _FixedState({k: v.detach().float() for k, v in state.items()})
    final = save_run_state(out, 0, model, None, ema, extra)
    (out / "config.json").write_text(json.dumps(run_config, indent=1))
    return final
