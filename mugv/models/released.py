"""Loading the released MUG-V DiT (``MUG-V-inference/dit.pt``): the config from the state-dict
shapes, a meta-device build, then the weights assigned in the target dtype.

The public ``MUGDiT_10B`` (``mug_v/dit/model.py`` of ``Shopee-MUG/MUG-V``) is saved as a plain
state dict with the module tree of :class:`mugv.models.MUGDiT`. Its sizes are read off the
shapes: ``hidden_size`` and ``in_channels`` from ``x_embedder.proj.weight``
``[C, C_in, pt, ph, pw]`` (which also gives the patch), ``depth`` from the highest
``blocks.<i>`` index, ``text_dim`` from ``y_embedder.y_proj.fc1.weight`` ``[C, text_dim]``,
``mlp_ratio`` from ``blocks.0.mlp.fc1.weight`` and ``num_heads = hidden_size / 72`` (every named
flavor has head_dim 72; the head count is not stored anywhere). A size that matches a named flavor
gets its name; any other is a custom config (e.g. a depth-2 test model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from mugv.models.dit import FLAVORS, DiTConfig, MUGDiT

__all__ = ["dit_config_from_state_dict", "load_released_dit"]

_HEAD_DIM = 72
_REQUIRED = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "blocks.0.mlp.fc1.weight",
             "t_block.1.weight", "final_layer.linear.weight")


def dit_config_from_state_dict(sd: Mapping[str, Tensor], *, where: str = "state dict",
                               head_dim: int = _HEAD_DIM) -> DiTConfig:
    """The :class:`DiTConfig` whose parameters have the shapes of ``sd``.

    Args:
        sd: a MUG-V DiT state dict (tensors or meta tensors).
        where: the file name, for messages.
        head_dim: per-head width used to get ``num_heads`` (72 for MUG-V; hidden sizes that
            72 does not divide fall back to the largest multiple of 6 dividing it).

    Raises:
        ValueError: ``sd`` is not a MUG-V DiT state dict; the message lists the keys it lacks and
            what it found instead.
    """
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        found = sorted({k.split(".")[0] for k in sd})
        raise ValueError(f"{where} is not a MUG-V DiT state dict: it lacks {missing}; found {len(sd)} keys with "
                         f"top-level names {found[:16]}" + (" (this looks like the VAE: pass it as vae.pt)"
                                                            if "spatial_vae" in found else ""))
    proj = sd["x_embedder.proj.weight"]
    if proj.dim() != 5:
        raise ValueError(f"{where}: x_embedder.proj.weight must be a 5-D conv weight, got {tuple(proj.shape)}")
    hidden, cin, *patch = proj.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit())
    text_dim = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    hd = head_dim if hidden % head_dim == 0 else max(d for d in range(6, hidden + 1, 6) if hidden % d == 0)
    fields = dict(depth=depth, hidden_size=hidden, num_heads=hidden // hd, patch_size=tuple(patch),
                  in_channels=cin, text_dim=text_dim, mlp_ratio=mlp_ratio)
    defaults = DiTConfig()
    for name, flavor in FLAVORS.items():
        cand = {**{f: getattr(defaults, f) for f in fields}, **flavor}
        if all(cand[f] == v for f, v in fields.items()):
            return DiTConfig.from_flavor(name)
    return DiTConfig(**fields)


def load_released_dit(path: str | os.PathLike | Mapping[str, Tensor], *, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, kernels: bool = True) -> MUGDiT:
    """Build :class:`MUGDiT` for the DiT state dict at ``path`` (``dit.pt``, or a directory
    holding it; ``.pt``/``.pth``/``.bin``/``.safetensors``; or an in-memory state dict, whose
    entries are consumed): the config from the shapes, the
    model on the meta device (nothing allocated), then every tensor cast to ``dtype``, moved to
    ``device`` and assigned (strict: every key must match).

    Raises:
        FileNotFoundError: no such file (names the expected layout).
        ValueError: not a MUG-V DiT state dict (lists what was found), or
            :class:`mugv.models.CheckpointMismatchError` listing mismatched keys/shapes.
    """
    from mugv.models.checkpoint import CheckpointMismatchError, read_state_dict

    if isinstance(path, Mapping):
        p, sd = "state dict", dict(path)
    else:
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "dit.pt")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"released DiT not found: {p} (expected the MUG-V-inference dit.pt, the MUGDiT "
                                    "state dict with x_embedder.*, blocks.<i>.*, final_layer.*)")
        sd = read_state_dict(p, map_location="cpu")
    cfg = dit_config_from_state_dict(sd, where=p)
    with torch.device("meta"):
        model = MUGDiT(cfg, kernels=kernels)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [(k, sd[k].shape, own[k].shape) for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(p, missing, unexpected, mismatched)
    for k in list(sd):
        v = sd.pop(k)
        sd[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
