"""The optional aesthetic scorer of ``mugv curate``: CLIP image embeddings and a small head.

The layout is the LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-
predictor, ``simple_inference.py``): a CLIP image embedding, L2-normalized, goes through a chain
of ``Linear`` layers (dropout between them in training, no nonlinearity) to one score, about 1
to 10 on the AVA scale. Nothing is downloaded: the scorer runs only when its files exist
locally, in one directory:

- a ``transformers`` ``CLIPVisionModelWithProjection`` (``config.json`` + weights) and its
  ``CLIPImageProcessor`` (``preprocessor_config.json``), e.g. written by ``save_pretrained``;
- ``aesthetic_head.safetensors``: the head, keys ``layers.<i>.weight`` ``[out, in]`` and
  ``layers.<i>.bias`` ``[out]``, applied in increasing ``i`` (the LAION checkpoint's keys are
  ``layers.0/2/4/6/7``; convert its ``.pth`` with ``safetensors.torch.save_file``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["HEAD_FILE", "load_aesthetic_scorer"]

#: The head's file name inside the scorer directory.
HEAD_FILE = "aesthetic_head.safetensors"


def load_aesthetic_scorer(path: str | Path, device: str = "cpu") -> Callable[[list[np.ndarray]], float]:
    """Load the scorer of ``path`` (see the module docstring).

    Args:
        path: the scorer directory.
        device: torch device of the model.

    Returns:
        ``score(frames) -> float``: the mean score of ``uint8 [H, W, 3]`` BGR frames.

    Raises:
        FileNotFoundError: ``path``, its model or its head file is missing.
        ValueError: the head's layers do not chain (shapes) or do not end in one output.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(path)
    for need in ("config.json", "preprocessor_config.json", HEAD_FILE):
        if not (path / need).exists():
            raise FileNotFoundError(f"aesthetic_weights {path}: missing {need} (see mugv.data.curate.aesthetic)")
    model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
    state = load_file(str(path / HEAD_FILE))
    idx = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))})
    layers = [(state[f"layers.{i}.weight"].float().to(device), state[f"layers.{i}.bias"].float().to(device))
              for i in idx]
    dim = model.config.projection_dim
    for w, b in layers:
        if w.ndim != 2 or w.shape[1] != dim or b.shape != (w.shape[0],):
            raise ValueError(f"{path / HEAD_FILE}: layer of shape {tuple(w.shape)} does not take {dim} inputs")
        dim = w.shape[0]
    if not layers or dim != 1:
        raise ValueError(f"{path / HEAD_FILE}: the head must end in one output, got {dim}")

    @torch.no_grad()
    def score(frames: list[np.ndarray]) -> float:
        rgb = [np.ascontiguousarray(f[..., ::-1]) for f in frames]
        pixels = processor(images=rgb, return_tensors="pt")["pixel_values"].to(device)
        x = torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds.float(), dim=-1)
        for w, b in layers:
            x = torch.nn.functional.linear(x, w, b)
        return float(x.mean())

    return score
