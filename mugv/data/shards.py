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
     "shards": [{"file": "shard_00000.safetensors", "source": "<video path>", "sha256": "<hex>",
                 "clips": [{"key": "0", "latent_shape": [C, T, h, w], "num_frames": F,
                            "height": H, "width": W, "fps": fps, "start_frame": s,
                            "caption": "...", "text_len": L, "source": "..."}, ...]}, ...],
     "report": {"processed": [...], "skipped": [{"source": ..., "reason": ...}], ...}}

A shard is written to ``<name>.tmp`` and renamed, then the index is rewritten (also through a
temporary file and ``os.replace``), so an interrupted run never leaves a half-written shard
in the index, and a resumed run skips every source whose shard is listed. ``sha256`` (the
shard file's checksum, optional) is checked when the shard is loaded.

A clip that cannot be loaded (a truncated or corrupt shard, a checksum mismatch, a missing
tensor or one of another shape than the index says) raises :class:`BadClipError` naming the
file and the clip; ``LatentDataset(skip_bad_clips=True)`` checks every clip up front instead,
drops the bad ones and lists them in ``bad_clips``.

:class:`LatentMixture` reads several such directories as one dataset (each clip keeps the
number of its directory, the group the packing sampler weights), optionally keeping only the
clips whose ``(frames, height, width)`` match a bucket pattern (:func:`parse_bucket`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mugv.config import ConfigError

__all__ = ["INDEX", "BadClipError", "LatentClip", "LatentDataset", "LatentMixture", "atomic_write_json",
           "clip_in_buckets", "file_sha256", "parse_bucket", "write_shard"]

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
    """Save ``tensors`` (contiguous CPU copies) to ``path`` atomically (``.tmp``, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BadClipError(ValueError):
    """A clip of a preprocessed dataset cannot be loaded (the message names the file and clip)."""


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
        skip_bad_clips: load every clip once now, drop those that fail (listed in
            ``bad_clips`` as ``{"file", "clip", "reason"}``) instead of raising at their load.
        buckets: keep only the clips whose ``(num_frames, height, width)`` match one of these
            patterns (:func:`parse_bucket`); empty = every clip.

    Raises:
        FileNotFoundError: no ``index.json`` in ``root``.
        ValueError: the index lists no clips (or, with ``skip_bad_clips``, no good one).
        ConfigError: a bad bucket pattern, or no clip matches the buckets.
        BadClipError: on ``dataset[i]``, clip ``i`` cannot be loaded (names file and clip).
    """

    def __init__(self, root: str | Path, cache: bool = True, *, skip_bad_clips: bool = False, buckets=()) -> None:
        self.root = Path(root)
        if not (self.root / INDEX).exists():
            raise FileNotFoundError(f"LatentDataset: {self.root / INDEX} not found; run `mugv preprocess` first")
        self.index = json.loads((self.root / INDEX).read_text())
        self.entries: list[tuple[str, dict]] = [
            (s["file"], c) for s in self.index["shards"] for c in s["clips"]
        ]
        if not self.entries:
            raise ValueError(f"LatentDataset: {self.root} holds no clips (see the report in {INDEX})")
        parsed = [parse_bucket(b) for b in buckets]
        if parsed:
            self.entries = [(f, c) for f, c in self.entries if clip_in_buckets(c, parsed)]
            if not self.entries:
                raise ConfigError(f"no clip of {self.root} matches the buckets {list(buckets)}")
        self.cache = cache
        self._shards: dict[str, dict[str, torch.Tensor]] = {}
        self._sha = {s["file"]: s.get("sha256") for s in self.index["shards"]}
        self.bad_clips: list[dict] = []
        if skip_bad_clips:
            good = []
            for i, (file, meta) in enumerate(self.entries):
                try:
                    self[i]
                except BadClipError as e:
                    self.bad_clips.append({"file": file, "clip": meta["key"], "reason": str(e)})
                else:
                    good.append((file, meta))
            self.entries = good
            if not good:
                raise ValueError(f"LatentDataset: every clip of {self.root} is bad: {self.bad_clips[:3]}")

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
        """The tensors of a shard (checksum checked when the index has one).

        Raises:
            OSError, ValueError: unreadable, truncated, corrupt or not matching its checksum.
        """
        if file in self._shards:
            return self._shards[file]
        path = self.root / file
        want = self._sha.get(file)
        if want is not None and file_sha256(path) != want:
            raise ValueError("its SHA-256 differs from the index (corrupt)")
        try:
            t = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header/size
            raise ValueError(f"not a readable safetensors file ({type(e).__name__}: {e})") from None
        if self.cache:
            self._shards[file] = t
        return t

    def __getitem__(self, i: int) -> LatentClip:
        file, meta = self.entries[i]
        k = meta["key"]
        where = f"{self.root / file}, clip {k!r} (source {meta.get('source', '?')})"
        try:
            t = self._shard(file)
        except (OSError, ValueError) as e:
            raise BadClipError(f"{where}: {e}") from None
        lat, text = t.get(f"{k}.latent"), t.get(f"{k}.text")
        if lat is None or text is None:
            raise BadClipError(f"{where}: tensor {k}.latent or {k}.text missing from the shard")
        if list(lat.shape) != list(meta["latent_shape"]):
            raise BadClipError(f"{where}: latent has shape {list(lat.shape)}, the index says {meta['latent_shape']}")
        if "text_len" in meta and text.shape[0] != meta["text_len"]:
            raise BadClipError(f"{where}: text has {text.shape[0]} tokens, the index says {meta['text_len']}")
        return LatentClip(lat.float(), text.float(), meta)


def parse_bucket(spec: str) -> tuple[tuple[int, int] | None, ...]:
    """A bucket pattern ``"FRAMESxHEIGHTxWIDTH"`` (pixel frames and pixels, as ``mugv
    preprocess`` writes them in the index) -> three ``(lo, hi)`` inclusive ranges, None for
    ``*`` (any). Each part is ``*``, an int ``n`` or a range ``lo-hi``: ``"1x*x*"`` = images,
    ``"49x352x640"`` = one shape, ``"41-49x*x*"`` = 41 to 49 frames at any size.

    Raises:
        ConfigError: not three ``x``-separated parts, or a part that is not ``*``, ``n`` or
            ``lo-hi`` with ``1 <= lo <= hi``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"bucket must be a string 'FRAMESxHEIGHTxWIDTH', got {spec!r}")
    parts = spec.strip().lower().split("x")
    if len(parts) != 3:
        raise ConfigError(f"bucket {spec!r}: expected 'FRAMESxHEIGHTxWIDTH' (e.g. '1x*x*', '49x352x640')")
    out: list[tuple[int, int] | None] = []
    for part in parts:
        part = part.strip()
        if part == "*":
            out.append(None)
            continue
        lo, _, hi = part.partition("-")
        try:
            rng = (int(lo), int(hi or lo))
        except ValueError:
            raise ConfigError(f"bucket {spec!r}: {part!r} is not '*', an int or 'lo-hi'") from None
        if not 1 <= rng[0] <= rng[1]:
            raise ConfigError(f"bucket {spec!r}: {part!r} must satisfy 1 <= lo <= hi")
        out.append(rng)
    return tuple(out)


def clip_in_buckets(meta: dict, buckets: list[tuple]) -> bool:
    """Whether a clip's index entry (``num_frames``, ``height``, ``width``) matches one of the
    parsed ``buckets`` (:func:`parse_bucket`); an empty list matches every clip."""
    if not buckets:
        return True
    shape = (int(meta["num_frames"]), int(meta["height"]), int(meta["width"]))
    return any(all(r is None or r[0] <= v <= r[1] for r, v in zip(b, shape)) for b in buckets)


class LatentMixture:
    """Several preprocessed directories as one dataset, with a sampling weight per directory
    and a bucket filter: what a training stage reads.

    Clip ``i`` of the mixture is clip ``items[i][1]`` of directory ``items[i][0]`` (after each
    directory's bucket filter); ``groups``
    (the directory of each clip) and ``weights`` feed the packing sampler's weighted draw
    (:class:`~mugv.data.sampler.PackingSampler`). It offers what the trainers use of a
    :class:`LatentDataset`: ``len``, ``[i]``, ``entries``, ``latent_shape``,
    ``latent_channels``, ``text_dim``, ``null_text`` (of the first directory), ``index`` (of
    the first directory) and ``bad_clips``.

    Args:
        roots: the directories (at least one).
        weights: one sampling weight per directory (>= 0, not all 0; normalized); None = equal.
        buckets, cache, skip_bad_clips: as :class:`LatentDataset`, for every directory.

    Raises:
        ConfigError: no roots; ``weights`` not one per root, negative or all 0; a bad bucket
            pattern; directories of other latent channels, text width or text encoder than the
            first; a directory left without clips by the buckets.
        FileNotFoundError, ValueError: as :class:`LatentDataset`.
    """

    def __init__(self, roots, weights=None, buckets=(), *, cache: bool = True, skip_bad_clips: bool = False) -> None:
        roots = [Path(r) for r in roots]
        if not roots:
            raise ConfigError("LatentMixture: expected at least one data directory")
        if weights is None or len(weights) == 0:
            weights = [1.0] * len(roots)
        w = [float(x) for x in weights]
        if len(w) != len(roots):
            raise ConfigError(f"data_weights: expected one weight per data directory ({len(roots)}), got {len(w)}")
        if any(not x >= 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"data_weights: expected weights >= 0, not all 0, got {w}")
        self.datasets = [LatentDataset(r, cache, skip_bad_clips=skip_bad_clips, buckets=buckets) for r in roots]
        first = self.datasets[0]
        for r, d in zip(roots[1:], self.datasets[1:]):
            for what in ("latent_channels", "text_dim"):
                if getattr(d, what) != getattr(first, what):
                    raise ConfigError(f"data directory {r}: {what} {getattr(d, what)} differs from {roots[0]}'s "
                                      f"{getattr(first, what)}; every directory of a stage needs the same VAE and "
                                      "text encoder")
            if d.index.get("text_encoder") != first.index.get("text_encoder"):
                raise ConfigError(f"data directory {r}: text encoder {d.index.get('text_encoder')!r} differs from "
                                  f"{roots[0]}'s {first.index.get('text_encoder')!r}")
        self.items = [(k, i) for k, d in enumerate(self.datasets) for i in range(len(d))]
        self.roots = roots
        self.weights = [x / sum(w) for x in w]
        self.groups = [k for k, _ in self.items]
        self.entries = [self.datasets[k].entries[i] for k, i in self.items]
        self.index = first.index
        self.bad_clips = [b for d in self.datasets for b in d.bad_clips]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LatentClip:
        k, j = self.items[i]
        return self.datasets[k][j]

    @property
    def latent_channels(self) -> int:
        return self.datasets[0].latent_channels

    @property
    def text_dim(self) -> int:
        return self.datasets[0].text_dim

    def latent_shape(self, i: int) -> tuple[int, int, int, int]:
        """``(C, T, h, w)`` of clip ``i`` without loading it."""
        k, j = self.items[i]
        return self.datasets[k].latent_shape(j)

    def null_text(self) -> torch.Tensor:
        """``float32 [L0, D]`` states of the empty caption (of the first directory)."""
        return self.datasets[0].null_text()
