"""HyperCloning: a wider DiT that computes the same function as a trained narrower one.

Width growth after Samragh et al. 2024, "Scaling Smart: Accelerating Large Language Model
Pre-training with Small Model Initialization" (arXiv 2409.12903): the small model's weights
are tiled ``k = N / C`` times so that every hidden activation of the wide model is the small
one's repeated ``k`` times (``x' = [x, x, ..., x]``), and the outputs are equal. The head
width stays ``head_dim`` and the wide model has ``k`` times the heads (e.g. 1728 = 24 x 72 ->
3456 = 48 x 72); the optimizer state starts fresh (a weights-only run, see
:mod:`mugv.train.runs`).

How each parameter kind is tiled (``tile`` = ``k`` copies concatenated along the axis, in
blocks: ``[w, w]``, not interleaved):

* **Linear between two widened vectors** (``t_embedder.mlp.2``, ``fps_embedder.mlp.2``,
  ``y_embedder.y_proj.fc2``, ``attn.proj``, ``cross_attn.q_linear``/``proj``,
  ``mlp.fc1``/``fc2``, and the grouped ones below): the weight tiled along both axes and
  divided by ``k`` (``W' x' = sum_j W/k x = W x`` per output copy); the bias tiled.
* **Grouped outputs**: ``attn.qkv`` (3 groups q, k, v), ``cross_attn.kv_linear`` (2) and
  ``t_block.1`` (6: shift/scale/gate of attention and MLP) tile each group on its own, so
  the wide q is ``[q, q]``: heads ``0..H-1`` then their copies, each copy an exact duplicate.
* **Linear from an unchanged input** (``t_embedder.mlp.0`` and ``fps_embedder.mlp.0`` from the
  256-d sinusoid, ``y_embedder.y_proj.fc1`` from the caption's ``text_dim``, the patch Conv3d
  ``x_embedder.proj`` from the latent channels): rows tiled, nothing divided. Cross-attention
  keys and values then come from a tiled caption embedding; ``text_dim`` is unchanged.
* **Linear to an unchanged output** (``final_layer.linear``, to ``prod(patch) * 2C_in``):
  columns tiled and divided by ``k``, rows and bias unchanged.
* **LayerNorm without affine** (adaLN, the caption embedder's norms, the final layer): no
  parameter; the mean and variance of a tiled vector equal the original's, so the normalized
  wide vector is the tiled normalized one.
* **LayerNorm with affine** (``cross_attn_norm``): weight and bias tiled.
* **Per-head RMSNorm** of q and k (``q_norm``, ``k_norm``, ``[head_dim]``): unchanged, since
  ``head_dim`` is unchanged and the heads are duplicated.
* **Attention**: each duplicated head sees duplicated q, k, v and gives the same output as the
  original head (same ``head_dim ** -0.5`` scale, same RoPE sections); the output projection's
  division by ``k`` averages the copies back.
* **adaLN tables** (``blocks.*.scale_shift_table [6, C]``, ``final_layer.scale_shift_table
  [2, C]``): each row tiled; the modulation ``x * (1 + scale) + shift`` and the gates act
  elementwise on tiled vectors.
* **Embeddings** (``start_token``, ``end_token``): tiled.

Noise: ``noise > 0`` adds i.i.d. Gaussian noise of standard deviation ``noise * rms(W')`` to
each expanded weight matrix and Conv3d kernel (not to biases, norms, tables or tokens), so the
copies can drift apart in training; it changes the function by about ``noise`` relative.
With ``noise = 0`` the wide model equals the small one up to rounding (the sums of the
divided copies).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mugv.models import DiTConfig, MUGDiT
from mugv.train.runs import (
    checkpoint_keys,
    dit_config_of,
    read_run_config,
    read_tensor,
    resolve_step_dir,
    write_weights_run,
)

__all__ = ["expand_config", "expand_model", "expand_run", "expand_state_dict", "expand_tensor"]

# (pattern on the parameter name, output groups or None = output unchanged, input tiled?)
_RULES: list[tuple[re.Pattern, int | None, bool]] = [
    (re.compile(p), g, i) for p, g, i in [
        (r"^x_embedder\.proj\.(weight|bias)$", 1, False),
        (r"^(t|fps)_embedder\.mlp\.0\.(weight|bias)$", 1, False),
        (r"^(t|fps)_embedder\.mlp\.2\.(weight|bias)$", 1, True),
        (r"^t_block\.1\.(weight|bias)$", 6, True),
        (r"^y_embedder\.y_proj\.fc1\.(weight|bias)$", 1, False),
        (r"^y_embedder\.y_proj\.fc2\.(weight|bias)$", 1, True),
        (r"^blocks\.\d+\.attn\.qkv\.(weight|bias)$", 3, True),
        (r"^blocks\.\d+\.(attn|cross_attn)\.(q_norm|k_norm)\.weight$", None, False),
        (r"^blocks\.\d+\.(attn|cross_attn)\.proj\.(weight|bias)$", 1, True),
        (r"^blocks\.\d+\.cross_attn_norm\.(weight|bias)$", 1, False),
        (r"^blocks\.\d+\.cross_attn\.q_linear\.(weight|bias)$", 1, True),
        (r"^blocks\.\d+\.cross_attn\.kv_linear\.(weight|bias)$", 2, True),
        (r"^blocks\.\d+\.mlp\.fc[12]\.(weight|bias)$", 1, True),
        (r"^(start|end)_token$", 1, False),
        (r"^final_layer\.linear\.(weight|bias)$", None, True),
    ]
]
_TABLE = re.compile(r"^(blocks\.\d+\.|final_layer\.)scale_shift_table$")


def _tile(t: Tensor, dim: int, groups: int, k: int) -> Tensor:
    """``t`` with axis ``dim`` seen as ``groups`` blocks, each repeated ``k`` times in place."""
    n = t.shape[dim]
    if n % groups:
        raise ValueError(f"axis {dim} of size {n} does not split into {groups} groups")
    shape = list(t.shape)
    v = t.reshape(*shape[:dim], groups, 1, n // groups, *shape[dim + 1:])
    reps = [1] * v.dim()
    reps[dim + 1] = k
    return v.repeat(*reps).reshape(*shape[:dim], n * k, *shape[dim + 1:])


def expand_tensor(name: str, t: Tensor, k: int) -> Tensor:
    """The wide version of one :class:`~mugv.models.MUGDiT` parameter (see the module docstring).

    Args:
        name: the public parameter name (e.g. ``"blocks.3.attn.qkv.weight"``).
        t: its value in the small model (any float dtype; the result has the same dtype).
        k: the width factor (an int >= 1).

    Raises:
        KeyError: a name that is not a MUGDiT parameter.
    """
    if _TABLE.match(name):
        return _tile(t, 1, 1, k)
    for pat, groups, tiled_in in _RULES:
        if pat.match(name):
            if groups is not None:
                t = _tile(t, 0, groups, k)
            if tiled_in and t.dim() >= 2:
                t = _tile(t, 1, 1, k) / k
            return t
    raise KeyError(f"{name!r} is not a MUGDiT parameter HyperCloning knows how to widen")


def expand_config(cfg: DiTConfig, hidden_size: int, num_heads: int | None = None) -> DiTConfig:
    """The config of the wide model: ``hidden_size = k * C``, ``num_heads = k * H`` (same head_dim).

    Raises:
        ValueError: ``hidden_size`` not a multiple of ``cfg.hidden_size`` greater than it; a
            ``num_heads`` that would change ``head_dim``; an MLP width ``int(C * mlp_ratio)``
            that does not scale by ``k``.
    """
    C = cfg.hidden_size
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise TypeError(f"hidden_size must be an int, got {type(hidden_size).__name__}")
    if hidden_size <= C or hidden_size % C:
        raise ValueError(
            f"--to-hidden-size {hidden_size}: HyperCloning tiles the width, so it must be a multiple k >= 2 of the "
            f"current hidden_size {C} (e.g. {2 * C}, {3 * C})"
        )
    k = hidden_size // C
    if num_heads is not None and num_heads != k * cfg.num_heads:
        raise ValueError(
            f"num_heads={num_heads} would change head_dim from {cfg.head_dim} to {hidden_size / num_heads:g}; "
            f"HyperCloning keeps head_dim and duplicates heads: num_heads must be {k * cfg.num_heads}"
        )
    if int(hidden_size * cfg.mlp_ratio) != k * int(C * cfg.mlp_ratio):
        raise ValueError(f"mlp_ratio={cfg.mlp_ratio}: the MLP width int({hidden_size} * ratio) is not {k} x "
                         f"int({C} * ratio), so the MLP cannot be tiled")
    return dataclasses.replace(cfg, hidden_size=hidden_size, num_heads=k * cfg.num_heads, flavor=None)


def _noised(name: str, t: Tensor, noise: float, generator: torch.Generator | None) -> Tensor:
    if noise <= 0 or t.dim() < 2:
        return t
    rms = t.float().pow(2).mean().sqrt()
    g = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return (t.float() + noise * rms * g).to(t.dtype)


def expand_state_dict(state: Mapping[str, Tensor], cfg: DiTConfig, hidden_size: int, *,
                      num_heads: int | None = None, noise: float = 0.0,
                      generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], DiTConfig]:
    """Widen a full :class:`~mugv.models.MUGDiT` state dict (tensor by tensor).

    Args:
        state: name -> tensor of the small model (CPU or any device).
        cfg: the small model's config.
        hidden_size: the new width ``N = k * cfg.hidden_size``.
        num_heads: optional check: must be ``k * cfg.num_heads``.
        noise: relative noise on the weight matrices (0 = exactly function-preserving).
        generator: for the noise.

    Returns:
        ``(wide_state, wide_cfg)``.

    Raises:
        ValueError: see :func:`expand_config`; ``noise < 0``. KeyError: an unknown parameter.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    wide = expand_config(cfg, hidden_size, num_heads)
    k = hidden_size // cfg.hidden_size
    out = {name: _noised(name, expand_tensor(name, t, k), noise, generator) for name, t in state.items()}
    return out, wide


def expand_model(model: MUGDiT, hidden_size: int, *, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> MUGDiT:
    """A new, wide :class:`~mugv.models.MUGDiT` (same device, dtype and backends) from ``model``."""
    sd, wide = expand_state_dict(model.state_dict(), model.cfg, hidden_size, noise=noise, generator=generator)
    with torch.device("meta"):
        out = MUGDiT(wide, kernels=model.kernels, attn_backend=model.attn_backend)
    out.load_state_dict(sd, strict=True, assign=True)
    return out


def expand_run(src: str | Path, hidden_size: int, out: str | Path, *, noise: float = 1e-3, source: str = "ema",
               num_heads: int | None = None, seed: int = 0) -> Path:
    """``mugv expand``: write a weights-only run (:mod:`mugv.train.runs`) with the wide model.

    Reads the checkpoint one tensor at a time; holds the wide weights (one model) in memory.

    Args:
        src: a run directory or one of its checkpoints (:func:`~mugv.train.runs.resolve_step_dir`).
        hidden_size: the new width. out: the new run directory.
        noise: relative symmetry-breaking noise (default 1e-3; 0 = exact).
        source: ``"ema"`` (default) or ``"model"`` weights.
        num_heads: optional check (must keep head_dim). seed: seed of the noise.

    Returns:
        The written checkpoint directory.

    Raises:
        FileNotFoundError: no such run/checkpoint. ValueError: a width that cannot be reached
        (see :func:`expand_config`). FileExistsError: ``out`` already has checkpoints.
    """
    run_dir, step_dir = resolve_step_dir(src)
    info = read_run_config(run_dir)
    cfg = dit_config_of(info)
    wide = expand_config(cfg, hidden_size, num_heads)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    k = hidden_size // cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (stored, shape, dtype) in sorted(checkpoint_keys(step_dir, source).items()):
        state[name] = _noised(name, expand_tensor(name, read_tensor(step_dir, stored, shape, dtype), k), noise, g)
    info = dict(info)
    info["dit"] = {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in dataclasses.asdict(wide).items()}
    if "train" in info:
        info["train"] = {**info["train"], "hidden_size": wide.hidden_size, "num_heads": wide.num_heads}
    info["expanded_from"] = {"checkpoint": str(step_dir), "hidden_size": cfg.hidden_size, "noise": noise,
                             "source": source}
    return write_weights_run(out, state, info, extra={"expanded_from": str(step_dir)})
