"""``mugv merge``: a weighted average of checkpoints (model soup / checkpoint averaging).

MUG-V averages EMA checkpoints at the end of training (arXiv 2510.17519 Sec. 4); averaging
the weights of runs that share an initialization is the "model soup" of Wortsman et al. 2022
(arXiv 2203.05482). Here::

    merged[name] = sum_i w_i * W_i[name] / sum_i w_i        (accumulated in float64)

for every weight ``name``, over checkpoints ``W_i`` of the same DiT shape, with the EMA
weights (default) or the raw ones. The checkpoints are read through DCP one tensor at a time
(:func:`mugv.train.runs.read_tensor`): memory holds the merged model plus one tensor per
input, never two full models. The result is a weights-only run (:mod:`mugv.train.runs`),
usable by ``mugv generate --checkpoint``, ``mugv train --init-from`` and ``mugv merge`` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mugv.train.runs import checkpoint_keys, read_run_config, read_tensor, resolve_step_dir, write_weights_run

__all__ = ["merge_checkpoints"]


def merge_checkpoints(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                      weights: Sequence[float] | None = None, source: str = "ema") -> Path:
    """Average checkpoints into the weights-only run ``out``.

    Args:
        inputs: two or more runs or checkpoints (:func:`~mugv.train.runs.resolve_step_dir`:
            ``RUN``, ``RUN/step_N``, ``RUN/checkpoints/step_N``).
        out: the new run directory (``config.json`` from the first input's run, plus
            ``merged_from``).
        weights: one non-negative weight per input, normalized by their sum (default: equal).
        source: ``"ema"`` (the EMA where a checkpoint holds one, else raw) or ``"model"``.

    Returns:
        The written checkpoint directory.

    Raises:
        ValueError: fewer than two inputs; a weight count that differs from the inputs; a
            negative, non-finite or all-zero weight; checkpoints whose names or shapes differ.
        FileNotFoundError: an input that is not a run or checkpoint.
        FileExistsError: ``out`` already holds checkpoints.
    """
    inputs = list(inputs)
    if len(inputs) < 2:
        raise ValueError(f"merge needs at least two --inputs, got {len(inputs)}")
    if weights is None:
        weights = [1.0] * len(inputs)
    weights = [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise ValueError(f"--weights has {len(weights)} values for {len(inputs)} --inputs")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    resolved = [resolve_step_dir(p) for p in inputs]
    keys = [checkpoint_keys(step, source) for _, step in resolved]
    for (_, step), ks in zip(resolved[1:], keys[1:]):
        if set(ks) != set(keys[0]):
            diff = sorted(set(ks) ^ set(keys[0]))
            raise ValueError(f"{step} and {resolved[0][1]} hold different weights: {diff[:5]}")
        bad = [n for n in ks if ks[n][1] != keys[0][n][1]]
        if bad:
            raise ValueError(f"{step}: {bad[0]} has shape {tuple(ks[bad[0]][1])}, "
                             f"{resolved[0][1]} has {tuple(keys[0][bad[0]][1])}")
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(keys[0]):
        acc = None
        for (_, step), ks, w in zip(resolved, keys, weights):
            stored, shape, dtype = ks[name]
            t = read_tensor(step, stored, shape, dtype).double() * w
            acc = t if acc is None else acc.add_(t)
        merged[name] = acc.to(keys[0][name][2])
    info = dict(read_run_config(resolved[0][0]))
    info["merged_from"] = {"checkpoints": [str(s) for _, s in resolved], "weights": weights, "source": source}
    return write_weights_run(out, merged, info)
