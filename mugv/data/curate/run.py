"""Orchestration of ``mugv curate``: scan every video (in parallel), resume, filter, dedup, report.

Output directory layout:

- ``videos.jsonl``: one line per finished video (its :func:`~mugv.data.curate.scan.scan_video`
  record), appended by the parent process with a single ``write`` + ``fsync`` as each video
  finishes. A rerun reads it back, drops a torn last line (a kill mid-write), and skips every
  video already listed, so a killed run loses at most the videos in flight and never
  records one twice.
- ``state.json``: the scan settings (:data:`SCAN_FIELDS`); resuming
  with other scan settings is an error. Filter thresholds may change between runs: filtering
  and dedup are recomputed from the recorded metrics every time.
- ``thumbs/``: one JPEG per clip; ``clips.csv``, ``report.json``, ``report.html``
  (:mod:`.report`), rewritten atomically at the end of every run.

Backends: ``local`` runs ``workers`` processes (``spawn``; 1 = in this process) and ``ray``
runs the same per-video function as Ray tasks of one CPU each, on the cluster at
``ray_address`` or on a Ray started on this machine with ``workers`` CPUs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mugv.config import ConfigError, CurateConfig
from mugv.data.curate.report import _atomic_write, write_outputs
from mugv.data.curate.scan import scan_video
from mugv.data.curate.select import select_clips

__all__ = ["BACKENDS", "curate", "list_curate_videos", "read_records"]

#: Execution backends of :func:`curate`.
BACKENDS = ("local", "ray")
#: Fields that change what a video scan records: an output directory scanned with other
#: values cannot be resumed (the filter thresholds may change freely between runs).
SCAN_FIELDS = (
    "detect_short_side",
    "detect_threshold",
    "min_scene_frames",
    "cut_trim_frames",
    "work_short_side",
    "num_samples",
    "flow",
    "black_luma",
    "frozen_diff",
    "aesthetic_weights",
    "dedup_frames",
    "thumbnails",
)
RECORDS = "videos.jsonl"
STATE = "state.json"
THUMBS = "thumbs"


def list_curate_videos(videos: list[str] | str | None) -> list[Path]:
    """The video files named by ``videos`` (files or folders; empty = the embedded clips), in
    the given order, folders expanded to their video files sorted, duplicates dropped.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    from mugv.data.video import VIDEO_EXTENSIONS, embedded_videos

    if isinstance(videos, (str, Path)):
        videos = [str(videos)] if str(videos) else []
    if not videos:
        return embedded_videos()
    out: list[Path] = []
    for v in videos:
        p = Path(v)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            raise FileNotFoundError(f"--videos {v}: no such file or folder")
        out.extend(f for f in found if f not in out)
    return out


def read_records(out: str | Path) -> list[dict]:
    """The video records of ``out/videos.jsonl``, in the order written; a torn last line is
    cut off the file (it is the video that was in flight when a run was killed)."""
    path = Path(out) / RECORDS
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _append(path: Path, rec: dict) -> None:
    line = (json.dumps(rec, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _task(path: str, cfg: CurateConfig, thumbs: str | None) -> dict:
    """One video in a worker: as many OpenCV threads as decoder threads (1 by default: one core
    per worker), then :func:`scan_video`."""
    import cv2

    cv2.setNumThreads(max(1, cfg.decode_threads))
    return scan_video(path, cfg, thumbs, scorer=_scorer(cfg))


_SCORERS: dict[str, object] = {}


def _scorer(cfg: CurateConfig):
    """The aesthetic scorer of ``cfg.aesthetic_weights`` (loaded once per process), or None."""
    if not cfg.aesthetic_weights:
        return None
    if cfg.aesthetic_weights not in _SCORERS:
        from mugv.data.curate.aesthetic import load_aesthetic_scorer

        _SCORERS[cfg.aesthetic_weights] = load_aesthetic_scorer(cfg.aesthetic_weights)
    return _SCORERS[cfg.aesthetic_weights]


def _run_local(todo: list[Path], cfg: CurateConfig, thumbs: str | None, on_done) -> None:
    if cfg.workers <= 1:
        for p in todo:
            on_done(_task(str(p), cfg, thumbs))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_task, str(p), cfg, thumbs) for p in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                on_done(fut.result())


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError("backend = 'ray' needs Ray, which is not installed: pip install 'mugv[ray]'") from e
    return ray


def _run_ray(todo: list[Path], cfg: CurateConfig, thumbs: str | None, on_done, ray_init: dict | None) -> None:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kw = dict(ray_init or {})
        if cfg.ray_address:
            kw.setdefault("address", cfg.ray_address)
        else:
            kw.setdefault("num_cpus", max(1, cfg.workers))
        kw.setdefault("include_dashboard", False)
        kw.setdefault("log_to_driver", False)
        ray.init(**kw)
        started = True
    try:
        task = ray.remote(num_cpus=1)(_task)
        pending = [task.remote(str(p), cfg, thumbs) for p in todo]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_done(ray.get(ref))
    finally:
        if started:
            ray.shutdown()


def _settings(cfg: CurateConfig) -> dict:
    return {k: getattr(cfg, k) for k in SCAN_FIELDS}


def curate(cfg: CurateConfig, *, ray_init: dict | None = None) -> dict:
    """Run ``mugv curate`` for ``cfg`` (see the module docstring); returns the report.

    Args:
        cfg: the :class:`~mugv.config.CurateConfig`.
        ray_init: extra keyword arguments of ``ray.init`` for ``backend = "ray"`` (e.g.
            ``{"object_store_memory": 10**8}``); ignored when Ray is already initialized.

    Returns:
        The dict written to ``report.json`` (see :func:`mugv.data.curate.report.summarize`).

    Raises:
        ConfigError: unknown backend, ``workers < 1``, ``backend = "ray"`` without Ray installed,
            or an output directory scanned with other scan settings.
        FileNotFoundError: a video path does not exist.
    """
    t0 = time.perf_counter()
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.workers < 1:
        raise ConfigError(f"workers must be >= 1, got {cfg.workers}")
    if cfg.backend == "ray":
        _import_ray()
    videos = list_curate_videos(cfg.videos)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg)
    state_path = out / STATE
    if state_path.exists():
        old = json.loads(state_path.read_text()).get("settings")
        if old != settings:
            raise ConfigError(f"{out} was scanned with other settings ({old}); use another --out or delete it")
    else:
        _atomic_write(state_path, json.dumps({"version": 1, "settings": settings}, indent=1).encode())
    records = {r["source"]: r for r in read_records(out)}
    resumed = [str(p) for p in videos if str(p) in records]
    todo = [p for p in videos if str(p) not in records]
    thumbs = str(out / THUMBS) if cfg.thumbnails else None
    bar = None
    if cfg.progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="curate", dynamic_ncols=True)

    def on_done(rec: dict) -> None:
        _append(out / RECORDS, rec)
        records[rec["source"]] = rec
        if bar is not None:
            bar.update(1)

    try:
        if todo:
            (_run_ray if cfg.backend == "ray" else _run_local)(todo, cfg, thumbs, on_done,
                                                               *((ray_init,) if cfg.backend == "ray" else ()))
    finally:
        if bar is not None:
            bar.close()
    ordered = [records[str(p)] for p in videos]
    rows = select_clips(ordered, cfg)
    return write_outputs(out, ordered, rows, cfg, resumed=resumed, seconds=time.perf_counter() - t0)
