"""Latent shards: ``safetensors`` files of VAE latents and caption states, plus one JSON index.

Layout of a preprocessed dataset directory::

    index.json              # everything but the tensors (see below), rewritten atomically
    null_text.safetensors   # "text" [L0, D]: the empty caption's states (CFG / caption dropout)
    shard_00000.safetensors # "<k>.latent" [C, T, h, w], "<k>.text" [L, D] for each clip k
    shard_00001.safetensors
    ...

``index.json``::

    {"version": 1, "latent_channels": C, "text_dim": D, "text_encoder": "...",
     "vae": "<checkpoint dir>", "settings": {the preprocess options},
     "shards": [{"file": "shard_00000.safetensors", "source": "<video path>",
                 "clips": [{"key": "0", "latent_shape": [C, T, h, w], "num_frames": F,
                            "height": H, "width": W, "fps": fps, "start_frame": s,
                            "caption": "...", "text_len": L, "source": "..."}, ...]}, ...],
     "report": {"processed": [...], "skipped": [{"source": ..., "reason": ...}], ...}}

A shard is written to ``<name>.tmp`` and renamed, then the index is rewritten (also through a
temporary file and ``os.replace``), so an interrupted run never leaves a half-written shard
in the index, and a resumed run skips every source whose shard is listed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["INDEX", "LatentClip", "LatentDataset", "atomic_write_json", "write_shard"]

INDEX = "index.json"
NULL_TEXT = "null_text.safetensors"


def atomic_write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through ``path.tmp`` + ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` (contiguous CPU copies) to ``path`` atomically (``.tmp`` then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass(frozen=True)
class LatentClip:
    """One training example.

    Attributes:
        latent: ``float32 [C, T, h, w]`` VAE latent (normalized by the VAE's latent statistics).
        text: ``float32 [L, D]`` caption token states (padding stripped).
        meta: the clip's entry of the index (caption, fps, shape, source, ...).
    """

    latent: torch.Tensor
    text: torch.Tensor
    meta: dict


class LatentDataset:
    """Random access to the clips of a preprocessed directory.

    Args:
        root: the directory written by ``mugv preprocess``.
        cache: keep loaded shards in memory (the demo's data are a few MB).

    Raises:
        FileNotFoundError: no ``index.json`` in ``root``.
        ValueError: the index lists no clips.
    """

    def __init__(self, root: str | Path, cache: bool = True) -> None:
        self.root = Path(root)
        if not (self.root / INDEX).exists():
            raise FileNotFoundError(f"LatentDataset: {self.root / INDEX} not found; run `mugv preprocess` first")
        self.index = json.loads((self.root / INDEX).read_text())
        self.entries: list[tuple[str, dict]] = [
            (s["file"], c) for s in self.index["shards"] for c in s["clips"]
        ]
        if not self.entries:
            raise ValueError(f"LatentDataset: {self.root} holds no clips (see the report in {INDEX})")
        self.cache = cache
        self._shards: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def latent_channels(self) -> int:
        return int(self.index["latent_channels"])

    @property
    def text_dim(self) -> int:
        return int(self.index["text_dim"])

    def latent_shape(self, i: int) -> tuple[int, int, int, int]:
        """``(C, T, h, w)`` of clip ``i`` without loading it."""
        return tuple(self.entries[i][1]["latent_shape"])  # type: ignore[return-value]

    def null_text(self) -> torch.Tensor:
        """``float32 [L0, D]`` states of the empty caption."""
        return load_file(str(self.root / NULL_TEXT))["text"].float()

    def _shard(self, file: str) -> dict[str, torch.Tensor]:
        if file in self._shards:
            return self._shards[file]
        t = load_file(str(self.root / file))
        if self.cache:
            self._shards[file] = t
        return t

    def __getitem__(self, i: int) -> LatentClip:
        file, meta = self.entries[i]
        t = self._shard(file)
        k = meta["key"]
        return LatentClip(t[f"{k}.latent"].float(), t[f"{k}.text"].float(), meta)
