"""Data pipeline: video utilities, preprocessing real (PyAV-made) videos with bad files in
the folder, resumability, and the embedded dataset."""

import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from mugv.config import ConfigError, PreprocessConfig, check_num_frames, load_config
from mugv.data.preprocess import preprocess, read_captions
from mugv.data.shards import LatentDataset
from mugv.data.video import (
    Bucket,
    clip_starts,
    decode_video,
    default_captions_csv,
    embedded_videos,
    list_videos,
    make_buckets,
    nearest_bucket,
    resample_indices,
    write_mp4,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _frames(t, h, w, seed=0):
    """Smooth moving gradients (compress well, decode close to the input)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(t):
        r = (xx * 255 // max(1, w - 1) + 8 * i) % 256
        g = (yy * 255 // max(1, h - 1)) % 256
        b = np.full_like(r, (seed * 40 + 5 * i) % 256)
        out.append(np.stack([r, g, b], -1).astype(np.uint8))
    return np.stack(out)


def test_buckets_and_resampling():
    bs = make_buckets(96)
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in bs)
    assert all(abs(b.height * b.width / 96**2 - 1) < 0.35 for b in bs)
    assert nearest_bucket(720, 1280, bs).aspect == pytest.approx(16 / 9, rel=0.15)
    assert nearest_bucket(1280, 720, bs).aspect < 1
    assert nearest_bucket(272, 640, bs).aspect > 2
    with pytest.raises(ValueError, match="base"):
        make_buckets(8)
    with pytest.raises(ValueError, match="empty"):
        nearest_bucket(10, 10, [])
    idx = resample_indices(250, 25.0, 8.0)
    assert idx[0] == 0 and np.all(np.diff(idx) >= 3) and len(idx) == 80
    assert len(resample_indices(30, 10.0, 30.0)) == 30  # never upsample
    assert clip_starts(40, 17, temporal_compression=8) == [0, 17]
    assert clip_starts(40, 9, stride=4, max_clips=3, temporal_compression=8) == [0, 16, 28]
    with pytest.raises(ValueError, match="8k\\+1"):
        clip_starts(40, 16, temporal_compression=8)


def test_frame_rule_follows_the_temporal_compression():
    assert [n for n in range(40) if _valid(n, 8)] == [1, 9, 17, 25, 33]
    assert [n for n in range(14) if _valid(n, 4)] == [1, 5, 9, 13]
    assert [n for n in range(4) if _valid(n, 1)] == [1, 2, 3]
    assert check_num_frames(17, 8) == 17
    with pytest.raises(ConfigError, match=r"--frames must be 4k\+1 .*got 7"):
        check_num_frames(7, 4, name="--frames")
    with pytest.raises(TypeError, match="int"):
        check_num_frames(9.0, 8)
    with pytest.raises(ValueError, match="temporal_compression"):
        check_num_frames(9, 0)
    assert clip_starts(20, 5, temporal_compression=4) == [0, 5, 10, 15]
    with pytest.raises(ConfigError, match="8k"):
        clip_starts(20, 5, temporal_compression=8)


def _valid(n, ft):
    try:
        return check_num_frames(n, ft) == n
    except ConfigError:
        return False


def test_decode_resize_crop_and_fps(tmp_path):
    p = write_mp4(_frames(24, 40, 100), tmp_path / "v.mp4", fps=24)
    v = decode_video(p, bucket=Bucket(32, 48), target_fps=8)
    assert v.frames.shape == (8, 32, 48, 3) and v.frames.dtype == np.uint8
    assert v.fps == pytest.approx(8.0) and v.source_fps == pytest.approx(24.0)
    assert v.source_size == (40, 100)
    full = decode_video(p)  # no bucket: the source size rounded to multiples of 16
    assert full.frames.shape == (24, 32, 96, 3)
    # odd sizes are padded for yuv420p
    q = write_mp4(_frames(3, 17, 33), tmp_path / "odd.mp4", fps=Fraction(30000, 1001))
    assert decode_video(q).source_size == (18, 34)


@pytest.fixture(scope="module")
def tiny_vae():
    from mugv.models.vae import VAEConfig, VideoVAE

    torch.manual_seed(0)
    return VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).eval()


class _StubText:
    """A deterministic stand-in for the MiniLM encoder (same interface, no model load)."""

    name, dim = "stub", 384

    def __call__(self, texts):
        from mugv.text import TextEmbeddings

        states = [torch.full((2 + len(t) % 3, self.dim), float(len(t))) for t in texts]
        lens = torch.tensor([0] + [s.shape[0] for s in states]).cumsum(0).to(torch.int32)
        return TextEmbeddings(torch.cat(states), lens, int(max(s.shape[0] for s in states)))


def _video_folder(root):
    root.mkdir()
    write_mp4(_frames(30, 48, 64, 1), root / "good_a.mp4", fps=24)  # 4:3 -> 10 frames at 8 fps
    write_mp4(_frames(20, 32, 96, 2), root / "good_b.mp4", fps=8)  # wide
    write_mp4(_frames(4, 48, 64, 3), root / "short.mp4", fps=8)  # too short
    (root / "corrupt.mp4").write_bytes(os.urandom(3000))
    data = (root / "good_a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "notes.txt").write_text("not a video")
    caps = root / "captions.csv"
    caps.write_text("video,caption\n" + "\n".join(
        f"{n}.mp4,\"caption of {n}\"" for n in ("good_a", "good_b", "short", "corrupt", "truncated")) + "\n")
    return caps


def test_preprocess_skips_bad_files_and_resumes(tmp_path, tiny_vae):
    caps = _video_folder(tmp_path / "videos")
    cfg = load_config(PreprocessConfig, overrides=dict(
        videos=str(tmp_path / "videos"), captions=str(caps), out=str(tmp_path / "shards"), base_resolution=48,
        num_frames=[9], fps=8.0, device="cpu"))  # fmt: skip
    rep = preprocess(cfg, vae=tiny_vae, text_encoder=_StubText(), progress=False)
    processed = sorted(os.path.basename(p["source"]) for p in rep["processed"])
    assert processed == ["good_a.mp4", "good_b.mp4"]
    skipped = {os.path.basename(s["source"]): s["reason"] for s in rep["skipped"]}
    assert skipped["short.mp4"].startswith("too short")
    assert skipped["corrupt.mp4"].startswith("unreadable")
    # a truncated file either fails to decode or comes out too short: never processed
    assert skipped["truncated.mp4"].startswith(("unreadable", "too short"))
    assert "notes.txt" not in skipped
    ds = LatentDataset(tmp_path / "shards")
    assert len(ds) == rep["num_clips"] == 3  # good_a: 10 frames -> 1 clip; good_b: 20 -> 2
    for i in range(len(ds)):
        clip = ds[i]
        C, T, h, w = clip.latent.shape
        assert (C, T) == (24, 2) and h * 8 == clip.meta["height"] and w * 8 == clip.meta["width"]
        assert clip.text.shape == (2 + len(clip.meta["caption"]) % 3, 384)
        assert torch.isfinite(clip.latent).all()
    bs = make_buckets(48)
    want = {nearest_bucket(48, 64, bs), nearest_bucket(32, 96, bs)}
    assert len(want) == 2 and {Bucket(ds[i].meta["height"], ds[i].meta["width"]) for i in range(3)} == want
    assert json.loads((tmp_path / "shards" / "report.json").read_text())["skipped"]
    # resume: nothing redone; a lost shard is redone
    shard = tmp_path / "shards" / ds.entries[0][0]
    mtime = shard.stat().st_mtime_ns
    rep2 = preprocess(cfg, vae=tiny_vae, text_encoder=_StubText(), progress=False)
    assert len(rep2["resumed"]) == 2 and not rep2["processed"] and shard.stat().st_mtime_ns == mtime
    other = tmp_path / "shards" / ds.entries[-1][0]
    other.unlink()
    rep3 = preprocess(cfg, vae=tiny_vae, text_encoder=_StubText(), progress=False)
    assert len(rep3["processed"]) == 1 and other.exists() and rep3["num_clips"] == 3
    # other settings in the same output directory are refused
    with pytest.raises(ValueError, match="other settings"):
        preprocess(load_config(PreprocessConfig, overrides={**cfg.__dict__, "fps": 4.0}), vae=tiny_vae,
                   text_encoder=_StubText(), progress=False)
    with pytest.raises(ValueError, match="8k\\+1"):
        preprocess(load_config(PreprocessConfig, overrides={**cfg.__dict__, "num_frames": [8]}), vae=tiny_vae,
                   text_encoder=_StubText(), progress=False)


def test_preprocess_clips_csv_cuts_only_inside_kept_segments(tmp_path, tiny_vae):
    """``clips`` (a curate clips.csv): clips are cut inside the kept segments only, never across one's end."""
    from mugv.data.curate.report import read_clips_csv

    root = tmp_path / "videos"
    root.mkdir()
    a = write_mp4(_frames(40, 48, 64, 1), root / "good_a.mp4", fps=8)
    b = write_mp4(_frames(20, 32, 96, 2), root / "good_b.mp4", fps=8)
    caps = root / "captions.csv"
    caps.write_text("video,caption\ngood_a.mp4,a\ngood_b.mp4,b\n")
    head = "source,clip,start_frame,end_frame,start_s,end_s,kept,reason\n"
    clips = tmp_path / "clips.csv"
    clips.write_text(head + f"{a},0,0,12,0,1.5,1,\n{a},1,14,26,1.75,3.25,0,blurry\n{a},2,28,40,3.5,5,1,\n"
                     f"{b},0,3,8,0.375,1,1,\n")  # b's only kept segment is shorter than a clip
    assert len(read_clips_csv(clips)) == 3 and len(read_clips_csv(clips, kept_only=False)) == 4
    cfg = load_config(PreprocessConfig, overrides=dict(
        clips=str(clips), captions=str(caps), out=str(tmp_path / "shards"), base_resolution=48, num_frames=[9],
        fps=8.0, device="cpu", max_clips_per_video=100))  # fmt: skip
    rep = preprocess(cfg, vae=tiny_vae, text_encoder=_StubText(), progress=False)
    assert [os.path.basename(p["source"]) for p in rep["processed"]] == ["good_a.mp4"]
    assert "no kept segment" in rep["skipped"][0]["reason"]
    ds = LatentDataset(tmp_path / "shards")
    starts = sorted(ds[i].meta["start_frame"] for i in range(len(ds)))
    assert starts == [0, 28]  # one 9-frame clip fits in [0, 12) and one in [28, 40); none in the rejected shot
    whole = preprocess(load_config(PreprocessConfig, overrides={**cfg.__dict__, "clips": "", "videos": str(root),
                                                                "out": str(tmp_path / "whole")}),
                       vae=tiny_vae, text_encoder=_StubText(), progress=False)
    assert whole["num_clips"] == 4 + 2  # whole videos: a gives 4 clips (some across segment ends), b 2
    bad = tmp_path / "bad.csv"
    bad.write_text("source,start\nx,0\n")
    with pytest.raises(ValueError, match="columns"):
        read_clips_csv(bad)


def test_captions_csv(tmp_path):
    caps = read_captions(None)
    assert {p.name for p in embedded_videos()} <= set(caps)
    assert default_captions_csv().exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match="video"):
        read_captions(bad)
    bad.write_text("video,caption\na.mp4,\n")
    with pytest.raises(ValueError, match="empty caption"):
        read_captions(bad)
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError):
        list_videos(tmp_path / "nope")


def test_embedded_clips_are_real_videos():
    paths = embedded_videos()
    assert [p.name for p in paths] == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]
    v = decode_video(paths[2], bucket=Bucket(48, 64), target_fps=8, max_frames=5)
    assert v.frames.shape == (5, 48, 64, 3) and v.source_size == (144, 176)
    assert v.frames.std() > 10  # real content, not a blank frame
