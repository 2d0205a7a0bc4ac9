"""The per-video step of ``mugv curate``: decode once, split at shot cuts, score each clip.

:func:`scan_video` is pure in the sense that matters for scaling out: it reads one file,
writes only that file's thumbnails, and returns a JSON-ready record, so a process pool or a
Ray task can run it anywhere.

One decoding pass (PyAV, ``decode_threads`` FFmpeg threads) feeds three consumers per frame:

1. PySceneDetect's ``ContentDetector`` (threshold and minimum scene length from the config)
   on the frame resized to ``detect_short_side`` (BGR), online: a cut is reported a few
   frames after it happens, at the index of the first frame of the new shot;
2. per-frame statistics on that small frame's luma: the mean (brightness, black frames) and
   the mean absolute change from the previous frame (frozen frames);
3. a bounded sample of the current shot for scoring: frame ``i`` and ``i + 1`` as luma at the
   working size (short side ``min(source, work_short_side)``), plus the small BGR frame for
   hashes and the thumbnail. The sample keeps every ``stride``-th frame of the shot, starting
   at 5 frames per second (:data:`_CANDIDATES_PER_S`); when it holds more than
   ``2 * num_samples`` frames the stride doubles and every other entry goes, so memory stays
   bounded on an hour-long shot. A shot shorter than ``num_samples / 5`` seconds is scored on
   fewer frames.

When a shot closes, ``cut_trim_frames`` frames are dropped on each side that touches a cut,
``num_samples`` sampled frames spread evenly over what is left are scored (sharpness: mean
Laplacian variance; motion: mean optical-flow magnitude to the next frame, px/frame at the
working size), and ``dedup_frames`` of them are hashed (see :mod:`.metrics`).

Times are ``frame / fps`` with the stream's average frame rate. A file that is empty, does not
open, has no video stream, fails mid-decode or ends before the frames its header declares is
returned with ``status = "failed"`` and the reason; no exception escapes for bad files.
"""

from __future__ import annotations

import hashlib
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from mugv.config import ConfigError, CurateConfig
from mugv.data.curate.metrics import FLOW_METHODS, flow_magnitude, laplacian_variance, phash_hex

__all__ = ["CLIP_METRICS", "scan_video", "video_key"]

#: Sampling starts at this many candidate frames per second of a shot (then thins out).
_CANDIDATES_PER_S = 5.0

#: The metric columns of a clip record, in ``clips.csv`` order.
CLIP_METRICS = (
    "sharpness",
    "motion",
    "brightness",
    "black_fraction",
    "frozen_fraction",
    "aesthetic",
)


def video_key(path: str | Path) -> str:
    """A short stable id of a video: its stem (sanitized) and 8 hex digits of its absolute path's SHA-1."""
    p = Path(path)
    digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p.stem)[:40]
    return f"{stem}_{digest}"


def _size_for(h: int, w: int, short: int, multiple: int = 2) -> tuple[int, int]:
    """``(height, width)`` with short side ``min(short, source short side)``, aspect kept,
    sides rounded to ``multiple``."""
    s = min(1.0, short / min(h, w))
    return tuple(max(multiple, int(round(x * s / multiple)) * multiple) for x in (h, w))


class _Sample:
    """The bounded, evenly strided sample of the current shot (see the module docstring)."""

    def __init__(self, cap: int, base_stride: int):
        self.cap = cap
        self.base = base_stride
        self.origin = 0
        self.stride = base_stride
        self.entries: dict[int, list] = {}  # frame -> [gray, next gray | None, small bgr]

    def wants(self, i: int) -> bool:
        return i >= self.origin and (i - self.origin) % self.stride == 0

    def add(self, i: int, gray: np.ndarray, bgr: np.ndarray) -> None:
        self.entries[i] = [gray, None, bgr]
        if len(self.entries) > self.cap:
            self.stride *= 2
            self.entries = {k: v for k, v in self.entries.items() if k < self.origin or self.wants(k)}

    def pop_before(self, k: int) -> dict[int, list]:
        """Entries of frames ``< k`` (removed), and restart sampling at ``k``."""
        done = {f: e for f, e in self.entries.items() if f < k}
        self.entries = {f: e for f, e in self.entries.items() if f >= k}
        self.origin, self.stride = k, self.base
        return done


_PLANAR_420 = ("yuv420p", "yuvj420p")


def _small_frame(frame, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(luma [h, w], bgr [h, w, 3])`` of a decoded frame, both ``uint8``.

    For 8-bit planar 4:2:0 (nearly all H.264/HEVC/VP9/AV1 video) the planes are resized with
    OpenCV (bilinear) and converted once (BT.601 I420); other formats go through swscale.
    """
    import cv2

    if frame.format.name in _PLANAR_420 and h % 4 == 0 and w % 4 == 0:
        fh, fw = frame.height, frame.width
        planes = []
        for k, (ph, pw) in enumerate(((fh, fw), ((fh + 1) // 2, (fw + 1) // 2), ((fh + 1) // 2, (fw + 1) // 2))):
            p = frame.planes[k]
            planes.append(np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:ph, :pw])
        y = cv2.resize(planes[0], (w, h), interpolation=cv2.INTER_LINEAR)
        buf = np.empty((h * 3 // 2, w), np.uint8)
        buf[:h] = y
        buf[h : h + h // 4] = cv2.resize(planes[1], (w // 2, h // 2), interpolation=cv2.INTER_LINEAR).reshape(h // 4, w)
        buf[h + h // 4 :] = cv2.resize(planes[2], (w // 2, h // 2), interpolation=cv2.INTER_LINEAR).reshape(h // 4, w)
        return y, cv2.cvtColor(buf, cv2.COLOR_YUV2BGR_I420)
    bgr = np.ascontiguousarray(frame.to_ndarray(width=w, height=h, format="bgr24", interpolation="BILINEAR"))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), bgr


def _clip_record(
    start: int, end: int, n_total: int, fps: float, luma: np.ndarray, diff: np.ndarray, sample: dict[int, list],
    cfg: CurateConfig, thumb: Path | None, scorer,
) -> dict:
    """Score shot ``[start, end)`` (trimmed at cuts) from the per-frame arrays and its sample."""
    s = start + (cfg.cut_trim_frames if start > 0 else 0)
    e = end - (cfg.cut_trim_frames if end < n_total else 0)
    e = max(e, s)
    rec = {
        "start_frame": s,
        "end_frame": e,
        "start_s": round(s / fps, 4),
        "end_s": round(e / fps, 4),
        "duration_s": round((e - s) / fps, 4),
        "num_frames": e - s,
        **{m: float("nan") for m in CLIP_METRICS},
        "phash": [],
        "thumb": "",
    }
    if e - s >= 1:
        rec["brightness"] = float(luma[s:e].mean())
        rec["black_fraction"] = float((luma[s:e] < cfg.black_luma).mean())
    if e - s >= 2:
        rec["frozen_fraction"] = float((diff[s + 1 : e] < cfg.frozen_diff).mean())
    frames = sorted(f for f, ent in sample.items() if s <= f and f + 1 < e and ent[1] is not None)
    if not frames:
        return rec
    pick = [frames[j] for j in np.unique(np.linspace(0, len(frames) - 1, cfg.num_samples).round().astype(int))]
    rec["sharpness"] = float(np.mean([laplacian_variance(sample[f][0]) for f in pick]))
    rec["motion"] = float(np.mean([flow_magnitude(sample[f][0], sample[f][1], cfg.flow) for f in pick]))
    hashed = [pick[j] for j in np.unique(np.linspace(0, len(pick) - 1, cfg.dedup_frames + 2).round().astype(int)[1:-1])]
    rec["phash"] = [phash_hex(sample[f][2]) for f in hashed] if hashed else [phash_hex(sample[pick[0]][2])]
    mid = sample[pick[len(pick) // 2]][2]
    if scorer is not None:
        rec["aesthetic"] = float(scorer([sample[f][2] for f in hashed or pick[:1]]))
    if thumb is not None:
        import cv2

        thumb.parent.mkdir(parents=True, exist_ok=True)
        tmp = thumb.with_name(thumb.stem + ".tmp.jpg")
        cv2.imwrite(str(tmp), mid, [cv2.IMWRITE_JPEG_QUALITY, 85])
        os.replace(tmp, thumb)
        rec["thumb"] = thumb.name
    return rec


def _failed(src: Path, reason: str, t0: float, **info) -> dict:
    return {"source": str(src), "key": video_key(src), "status": "failed", "reason": reason, "clips": [],
            "seconds": round(time.perf_counter() - t0, 4), **info}


def scan_video(path: str | Path, cfg: CurateConfig, thumbs_dir: str | Path | None = None, scorer=None) -> dict:
    """Decode one video, split it at shot cuts and score every clip (see the module docstring).

    Args:
        path: the video file.
        cfg: a :class:`~mugv.config.CurateConfig` (its scan fields are used).
        thumbs_dir: where clip thumbnails go (``<key>_<clip>.jpg``, written atomically); None:
            no thumbnails.
        scorer: an optional aesthetic scorer, called with a list of ``uint8 [H, W, 3]`` BGR
            frames and returning one score (see :mod:`.aesthetic`); None leaves ``aesthetic`` NaN.

    Returns:
        ``{"source", "key", "status": "ok" | "failed", "reason", "fps", "width", "height",
        "num_frames", "duration_s", "cuts": [frame], "clips": [clip], "seconds"}``; each clip has
        ``start_frame``/``end_frame`` (end exclusive), ``start_s``/``end_s``/``duration_s``,
        ``num_frames``, the :data:`CLIP_METRICS` (NaN when not measurable), ``phash`` (hex
        strings) and ``thumb`` (file name or ``''``).

    Raises:
        ConfigError: an invalid config value (``num_samples < 1``, unknown ``flow``, ...). Bad
            video files never raise.
    """
    import av
    import cv2
    from scenedetect import ContentDetector
    from scenedetect.common import FrameTimecode

    if cfg.num_samples < 1 or cfg.dedup_frames < 1:
        raise ConfigError(f"num_samples and dedup_frames must be >= 1, got {cfg.num_samples}, {cfg.dedup_frames}")
    if cfg.flow not in FLOW_METHODS:
        raise ConfigError(f"flow must be one of {FLOW_METHODS}, got {cfg.flow!r}")
    if cfg.detect_short_side < 16 or cfg.work_short_side < 16:
        raise ConfigError("detect_short_side and work_short_side must be >= 16 px")
    if cfg.decode_threads < 0 or cfg.cut_trim_frames < 0 or cfg.min_scene_frames < 0:
        raise ConfigError("decode_threads, cut_trim_frames and min_scene_frames must be >= 0")
    t0 = time.perf_counter()
    src = Path(path)
    key = video_key(src)
    try:
        size = os.path.getsize(src)
    except OSError as e:
        return _failed(src, f"cannot read: {e.strerror or e}", t0)
    if size == 0:
        return _failed(src, "empty file (0 bytes)", t0)
    try:
        container = av.open(str(src))
    except Exception as e:  # av.error.InvalidDataError, OSError, ...
        return _failed(src, f"cannot open: {e}", t0)
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            return _failed(src, f"no video stream (streams: {', '.join(kinds)})", t0)
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cfg.decode_threads != 1:
            cc.thread_type = "AUTO"
        cc.thread_count = cfg.decode_threads
        rate = stream.average_rate or stream.guessed_rate
        h0, w0 = cc.height, cc.width
        if not rate or not h0 or not w0:
            return _failed(src, f"no frame rate or size in the header (rate {rate}, size {w0}x{h0})", t0)
        rate = Fraction(rate.numerator, rate.denominator)
        fps = float(rate)
        info = {"fps": round(fps, 4), "width": w0, "height": h0}
        declared = int(stream.frames or 0)
        dh, dw = _size_for(h0, w0, cfg.detect_short_side, 4)
        wh, ww = _size_for(h0, w0, cfg.work_short_side)
        detector = ContentDetector(threshold=cfg.detect_threshold, min_scene_len=cfg.min_scene_frames)
        sample = _Sample(2 * cfg.num_samples, max(1, round(fps / _CANDIDATES_PER_S)))
        luma: list[float] = []
        diff: list[float] = []
        cuts: list[int] = []
        shots: list[tuple[int, int, dict]] = []
        start = 0
        prev_gray = None
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                g, small = _small_frame(frame, dh, dw)
                luma.append(cv2.mean(g)[0])
                diff.append(cv2.norm(g, prev_gray, cv2.NORM_L1) / g.size if prev_gray is not None else float("inf"))
                prev_gray = g
                prev_entry = sample.entries.get(i - 1)
                if prev_entry is not None or sample.wants(i):
                    gray = np.ascontiguousarray(frame.to_ndarray(width=ww, height=wh, format="gray", interpolation="AREA"))
                    if prev_entry is not None:
                        prev_entry[1] = gray
                    if sample.wants(i):
                        sample.add(i, gray, small)
                for tc in detector.process_frame(FrameTimecode(i, fps=rate), small):
                    k = tc.frame_num
                    if start < k <= i:
                        cuts.append(k)
                        shots.append((start, k, sample.pop_before(k)))
                        start = k
        except Exception as e:  # av.error.* on corrupt or truncated data
            return _failed(src, f"decoding failed after {i + 1} frames: {e}", t0, **info)
        n = i + 1
        if n == 0:
            return _failed(src, "no decodable frames", t0, **info)
        if declared and n < declared - 1:
            return _failed(src, f"truncated: decoded {n} of the {declared} frames the header declares", t0, **info)
        for tc in detector.post_process(FrameTimecode(n - 1, fps=rate)):
            k = tc.frame_num
            if start < k < n:
                cuts.append(k)
                shots.append((start, k, sample.pop_before(k)))
                start = k
        shots.append((start, n, sample.pop_before(n)))
    luma_a, diff_a = np.asarray(luma), np.asarray(diff)
    clips = []
    for ci, (s, e, smp) in enumerate(shots):
        thumb = Path(thumbs_dir) / f"{key}_{ci:04d}.jpg" if thumbs_dir is not None else None
        clips.append({"clip": ci, **_clip_record(s, e, n, fps, luma_a, diff_a, smp, cfg, thumb, scorer)})
    return {
        "source": str(src),
        "key": key,
        "status": "ok",
        "reason": "",
        **info,
        "num_frames": n,
        "duration_s": round(n / fps, 4),
        "cuts": cuts,
        "clips": clips,
        "seconds": round(time.perf_counter() - t0, 4),
    }
