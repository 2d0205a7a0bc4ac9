"""Training in stages: a run config with ``[[stages]]`` runs them in order, each from the
weights the previous one ended with (the curriculum of MUG-V, arXiv 2510.17519 Sec. 4:
images, then low-resolution short clips, then 720p clips).

Each ``[[stages]]`` table overrides fields of the run's :class:`~mugv.config.TrainConfig`
for that stage (typically ``steps``, ``token_budget``, ``lr``, ``lr_schedule``,
``warmup_steps``, ``anneal_steps``; the data: ``data``, or ``data_dirs`` with their
``data_weights``, filtered by ``buckets``; the task mix: ``i2v_ratio``, ``t2i_ratio`` and
the loss weights ``t2i_loss_weight``, ``t2v_loss_weight``, ``i2v_loss_weight``) and may have
a ``name``. ``configs/curriculum_10b.toml`` is the 10B schedule written this way. Stage ``i`` is the run ``<out>/stage_<i>_<name>`` of ``steps`` steps:

* stage 0 starts as the run config says (fresh, or ``init_from``); stage ``i > 0`` starts
  from the raw weights of stage ``i - 1``'s final checkpoint (``init_from``: a fresh
  optimizer, EMA, sampler and lr schedule on the new data);
* every stage ends with a checkpoint, so a boundary is always on disk;
* rerunning the same command skips the finished stages and resumes the unfinished one from
  its newest checkpoint, inside the stage (the trainer's exact resume).

Raises (from :func:`train_stages`): ConfigError for a stage table with unknown keys or
values of the wrong type, or an empty ``stages`` list.
"""

from __future__ import annotations

import re
from pathlib import Path

from mugv.config import ConfigError, TrainConfig, load_config, to_dict
from mugv.train import checkpoint as ckpt

__all__ = ["stage_configs", "train_stages"]


def stage_configs(base: TrainConfig, stages: list[dict]) -> list[TrainConfig]:
    """The :class:`TrainConfig` of each stage (see the module docstring).

    Raises:
        ConfigError: no stages, a stage that is not a table, unknown keys or bad values.
    """
    if not stages:
        raise ConfigError("stages: expected at least one [[stages]] table")
    out, root = [], Path(base.out)
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise ConfigError(f"stages[{i}]: expected a table, got {type(st).__name__}")
        st = dict(st)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(st.pop("name", f"{i}")))
        if "out" in st:
            raise ConfigError(f"stages[{i}]: 'out' is set by the stage (<out>/stage_<i>_<name>)")
        values = {**to_dict(base), **st, "out": str(root / f"stage_{i}_{name}")}
        if i > 0:
            values["init_from"] = out[-1].out
        try:
            out.append(load_config(TrainConfig, overrides=values))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({name}): {e}") from None
    return out


def _last_step(cfg: TrainConfig) -> int:
    if not Path(cfg.out, "checkpoints").is_dir():
        return 0
    last = ckpt.latest_checkpoint(cfg.out)
    return 0 if last is None else int(last.name.split("_")[1])


def train_stages(base: TrainConfig, stages: list[dict], stop_after: int | None = None) -> list:
    """Run the stages in order (``mugv train`` with ``[[stages]]``); returns the
    :class:`~mugv.train.trainer.TrainResult` of each stage run by this call (finished stages
    found on disk are skipped).

    Args:
        stop_after: stop after this many steps in total in this call (with a checkpoint),
            as an interrupted job would (tests).
    """
    from mugv.train.trainer import Trainer

    results, done = [], 0
    for cfg in stage_configs(base, stages):
        start = _last_step(cfg)
        if start >= cfg.steps:
            continue
        if stop_after is not None and done >= stop_after:
            break
        res = Trainer(cfg).fit(stop_after=None if stop_after is None else stop_after - done)
        done += res.step - start
        results.append(res)
        if res.step < cfg.steps:
            break
    return results
