"""``mugv preprocess``: real videos and images -> VAE latents + caption states in resumable shards.

For each video (sorted by path): decode with PyAV, resample to ``fps``, fit to the nearest
resolution bucket (resize to cover + center-crop), cut clips of every length in
``num_frames`` (each ``8k+1``: :func:`mugv.config.check_num_frames`), encode them with the
VAE (``encode_batch`` clips per call, ``encode_chunk_frames`` frames per streamed chunk),
encode the caption with the text encoder, and write one shard per video (see
:mod:`mugv.data.shards` for the layout).

Images (a folder's files with a suffix of :data:`~mugv.data.video.IMAGE_EXTENSIONS`, or an
image file) go through the same path as one-frame clips: PyAV decodes their single frame,
the same bucketing fits it, the VAE encodes it to one latent frame (``1 = 8 * 0 + 1``
frames, whatever ``num_frames`` says), and its index entry has ``num_frames`` 1, ``fps`` the
target ``fps`` (the frame rate the DiT is conditioned on) and ``"image": true``. The trainer
trains such clips text-to-image. Their captions come from the same CSV (the ``video`` column
names the image file).

With ``clips`` (a ``clips.csv`` of ``mugv curate``) the videos are the sources it names and
clips are cut only inside its kept segments (shots without transitions that passed the
quality filters); the ``max_clips_per_video`` spread is over all segments of a video.

Robustness: a file that cannot be opened, fails mid-decode (truncated/corrupt), is shorter
than the shortest clip length, or has no caption is skipped and listed with the reason in
the report (``index.json["report"]`` and ``report.json``); it never stops the run. Shards
are written atomically and the index after each one, so an interrupted run loses at most the
video in progress, and a rerun skips every video already in the index.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mugv.config import ConfigError, PreprocessConfig, check_num_frames, pick_device
from mugv.data.shards import INDEX, NULL_TEXT, atomic_write_json, file_sha256, write_shard
from mugv.data.video import (
    VideoDecodeError,
    clip_starts,
    decode_video,
    default_captions_csv,
    frames_to_tensor,
    is_image,
    list_videos,
    make_buckets,
)
from mugv.models.vae import VideoVAE
from mugv.text import encode_caption, load_text_encoder

__all__ = ["preprocess", "read_captions"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_captions(path: str | Path | None) -> dict[str, str]:
    """Captions by video file name from a CSV with a header ``video,caption``
    (``''``/None = the packaged ``mugv/data/captions.csv``). Keys are base names, so the CSV
    may list ``clip.mp4`` or ``some/dir/clip.mp4`` (relative to the videos folder: an absolute
    path or one with a ``..`` component, which would name a file outside it, is refused).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the header lacks ``video`` or ``caption``, a caption is empty, or a video
            path is absolute or climbs out of the videos folder (``..``).
    """
    path = Path(path) if path else default_captions_csv()
    if not path.exists():
        raise FileNotFoundError(f"--captions {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'video' and 'caption', got {reader.fieldnames}")
        out = {}
        for line, row in enumerate(reader, start=2):
            video = (row["video"] or "").strip()
            if Path(video).is_absolute() or video.startswith(("/", "\\")) or ".." in Path(video).parts \
                    or ".." in video.replace("\\", "/").split("/"):
                raise ValueError(f"{path}:{line}: video {video!r} names a file outside the videos folder "
                                 "(absolute or '..'); give paths relative to --videos")
            cap = (row["caption"] or "").strip()
            if not cap:
                raise ValueError(f"{path}:{line}: empty caption for {row['video']!r}")
            out[Path(row["video"].strip()).name] = cap
    return out


def _shard_name(src: Path) -> str:
    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in src.stem)[:40]
    return f"shard_{stem}_{digest}.safetensors"


def _segments(path: str) -> tuple[list[Path], dict[str, list[tuple[int, int]]], str]:
    """Sources (in order of first appearance), kept ``[start, end)`` source-frame segments per
    source, and the SHA-1 of the CSV, from a curate ``clips.csv``."""
    from mugv.data.curate.report import read_clips_csv

    rows = read_clips_csv(path)
    segs: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        segs.setdefault(str(Path(r["source"]).resolve()), []).append((r["start_frame"], r["end_frame"]))
    return [Path(s) for s in segs], segs, hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _segment_starts(indices, segments: list[tuple[int, int]] | None, length: int, cfg: PreprocessConfig,
                    temporal_compression: int) -> list[int]:
    """Clip starts (into the decoded frames) of ``length`` frames: over the whole video, or only
    inside ``segments`` (source-frame ranges, mapped through the decoded frames' ``indices``)."""
    if segments is None:
        return clip_starts(len(indices), length, cfg.clip_stride or None, cfg.max_clips_per_video,
                           temporal_compression=temporal_compression)
    starts: list[int] = []
    for s, e in segments:
        lo, hi = int(np.searchsorted(indices, s)), int(np.searchsorted(indices, e))  # decoded frames in [s, e)
        starts += [lo + k for k in clip_starts(hi - lo, length, cfg.clip_stride or None, None,
                                               temporal_compression=temporal_compression)]
    if len(starts) > cfg.max_clips_per_video:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, cfg.max_clips_per_video).round().astype(int)]
    return starts


def _settings(cfg: PreprocessConfig, vae_dir: str) -> dict:
    return {
        "vae": vae_dir,
        "fps": cfg.fps,
        "base_resolution": cfg.base_resolution,
        "aspect_ratios": list(cfg.aspect_ratios),
        "num_frames": list(cfg.num_frames),
        "clip_stride": cfg.clip_stride,
        "max_clips_per_video": cfg.max_clips_per_video,
        "latent_dtype": cfg.latent_dtype,
        "text_encoder": cfg.text_encoder,
    }


def preprocess(cfg: PreprocessConfig, *, vae=None, text_encoder=None, progress: bool = True) -> dict:
    """Run the pipeline of the module docstring; returns the report.

    Args:
        cfg: the :class:`PreprocessConfig` (``cfg.vae`` must name a VAE checkpoint unless
            ``vae`` is given).
        vae: an already loaded :class:`~mugv.models.VideoVAE` (skips loading ``cfg.vae``).
        text_encoder: an already loaded :class:`mugv.text.TextEncoder` (default: ``cfg.text_encoder``).
        progress: show a tqdm bar.

    Returns:
        ``{"processed": [{"source", "clips", "bucket"}], "skipped": [{"source", "reason"}],
        "resumed": [sources], "num_clips": N, "seconds": s}``.

    Raises:
        ConfigError: bad options (a clip length not ``8k+1`` for the VAE, no VAE), or an
            output directory preprocessed with other settings.
        FileNotFoundError: missing videos/captions/VAE checkpoint.
    """
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    if vae is None:
        if not cfg.vae:
            raise ConfigError("preprocess needs --vae CHECKPOINT (a directory written by `mugv train-vae`)")
        vae = VideoVAE.from_pretrained(cfg.vae, device=device)
    for n in cfg.num_frames:
        check_num_frames(n, vae.config.temporal_compression, name="num_frames")
    vae_dir = str(Path(cfg.vae).resolve()) if cfg.vae else ""
    vae.eval()
    if text_encoder is None:
        text_encoder = load_text_encoder(cfg.text_encoder, device=device)
    segments: dict[str, list[tuple[int, int]]] | None = None
    if cfg.clips:
        videos, segments, clips_sha1 = _segments(cfg.clips)
    else:
        videos = list_videos(cfg.videos, images=True)
    captions = read_captions(cfg.captions)
    buckets = make_buckets(cfg.base_resolution, tuple(cfg.aspect_ratios))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, vae_dir)
    if cfg.clips:
        settings["clips_sha1"] = clips_sha1
    index_path = out / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("settings") != settings:
            raise ConfigError(
                f"{out} was preprocessed with other settings ({index.get('settings')}); use another --out "
                "or delete it"
            )
    else:
        index = {
            "version": 1,
            "settings": settings,
            "vae": vae_dir,
            "latent_channels": vae.config.latent_channels,
            "text_encoder": text_encoder.name,
            "text_dim": text_encoder.dim,
            "shards": [],
        }
    if not (out / NULL_TEXT).exists():
        write_shard(out / NULL_TEXT, {"text": encode_caption(text_encoder, "")})
    done = {s["source"]: s for s in index["shards"] if (out / s["file"]).exists()}
    index["shards"] = list(done.values())
    report: dict = {"processed": [], "skipped": [], "resumed": [], "num_clips": 0}
    dtype = _DTYPES[cfg.latent_dtype]
    min_len = min(cfg.num_frames)
    bar = tqdm(videos, desc="preprocess", dynamic_ncols=True, disable=not progress)
    for src in bar:
        key = str(src.resolve())
        bar.set_postfix_str(src.name, refresh=False)
        if key in done:
            report["resumed"].append(key)
            continue
        reason = None
        image = is_image(src) and segments is None
        caption = captions.get(src.name)
        if caption is None:
            reason = "no caption in the captions CSV"
        else:
            try:
                vid = decode_video(src, buckets=buckets, target_fps=None if image else cfg.fps,
                                   max_frames=1 if image else None)
            except VideoDecodeError as e:
                reason = f"unreadable: {e}"
            else:
                n = len(vid.frames)
                if image and n < 1:
                    reason = "no frame decoded from the image"
                elif image:
                    pass
                elif n < min_len:
                    reason = f"too short: {n} frames at {vid.fps:.2f} fps, the shortest clip needs {min_len}"
                elif segments is not None and not any(
                    _segment_starts(vid.indices, segments[key], length, cfg, vae.config.temporal_compression)
                    for length in cfg.num_frames
                ):
                    reason = f"no kept segment holds {min_len} frames at {vid.fps:.2f} fps"
        if reason is not None:
            report["skipped"].append({"source": key, "reason": reason})
            if progress:
                bar.write(f"skipped {src.name}: {reason}")
            continue
        text = encode_caption(text_encoder, caption)  # [L, D]
        tensors: dict[str, torch.Tensor] = {}
        clips_meta = []
        for length in [1] if image else cfg.num_frames:
            starts = [0] if image else _segment_starts(vid.indices, None if segments is None else segments[key],
                                                       length, cfg, vae.config.temporal_compression)
            for b in range(0, len(starts), max(1, cfg.encode_batch)):
                group = starts[b : b + max(1, cfg.encode_batch)]
                x = torch.stack([frames_to_tensor(vid.frames[s : s + length]) for s in group]).to(device)
                with torch.no_grad():
                    z = vae.encode(x, chunk_frames=cfg.encode_chunk_frames or None).mode()  # [B, C, L, h, w]
                for s, zi in zip(group, z):
                    k = str(len(clips_meta))
                    tensors[f"{k}.latent"] = zi.to(dtype)
                    tensors[f"{k}.text"] = text.to(dtype).clone()
                    clips_meta.append({
                        "key": k, "latent_shape": list(zi.shape), "num_frames": length,
                        "height": vid.bucket.height, "width": vid.bucket.width, "fps": cfg.fps if image else vid.fps,
                        "start_frame": int(s), "caption": caption, "text_len": int(text.shape[0]), "source": key,
                        **({"image": True} if image else {}),
                    })  # fmt: skip
        file = _shard_name(src)
        write_shard(out / file, tensors)
        index["shards"].append({"file": file, "source": key, "sha256": file_sha256(out / file), "clips": clips_meta})
        index["report"] = report
        atomic_write_json(index_path, index)
        report["processed"].append({"source": key, "clips": len(clips_meta), "bucket": vid.bucket.name})
    report["num_clips"] = sum(len(s["clips"]) for s in index["shards"])
    report["seconds"] = time.perf_counter() - t_start
    index["report"] = report
    atomic_write_json(index_path, index)
    atomic_write_json(out / "report.json", report)
    return report
