"""Stages on mixed image/video data: weighted data directories, bucket filters, the t2i/t2v/i2v
task mix and its loss weights, image folders in preprocess, and the 10B curriculum file."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mugv.config import ConfigError, TrainConfig, load_config
from mugv.data.sampler import PackingSampler
from mugv.data.shards import LatentDataset, LatentMixture, parse_bucket
from mugv.train.trainer import Trainer, check_task_mix, clip_randomness, task_of
from tests.stack.test_train import C, D, _cfg, make_shards

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def _shards(root: Path, shapes, seed: int = 0) -> Path:
    """A preprocessed directory of random latents with the latent shapes ``(T, h, w)`` given
    (``T == 1``: an image, as ``preprocess`` writes it)."""
    return make_shards(root, len(shapes), seed, shapes=list(shapes), text_lens=4, images=True)


IMAGES = [(1, 4, 8), (1, 6, 6), (1, 4, 4), (1, 8, 4)]
VIDEOS = [(3, 4, 8), (2, 6, 6), (3, 4, 4), (2, 4, 6)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return _shards(root / "images", IMAGES, seed=1), _shards(root / "videos", VIDEOS, seed=2)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(``p``) draws is within ``sigmas`` standard deviations of ``n p``."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def test_each_task_is_drawn_at_its_rate():
    n, i2v, t2i = 4000, 0.3, 0.2
    video, image = (2, 3, 2, 2), (2, 1, 2, 2)
    draws = [clip_randomness(7, s // 8, s % 8, video, shift=2.0, i2v_ratio=i2v, caption_dropout=0.1, t2i_ratio=t2i,
                             image_shift=1.0) for s in range(n)]
    counts = {k: sum(d.task == k for d in draws) for k in ("t2i", "t2v", "i2v")}
    assert _within(counts["i2v"], n, i2v) and _within(counts["t2i"], n, t2i)
    assert _within(counts["t2v"], n, 1 - i2v - t2i) and sum(counts.values()) == n
    assert _within(sum(d.drop_caption for d in draws), n, 0.1)
    for d in draws:  # t2i trains the first latent frame alone; the others the whole clip
        assert d.noise.shape[1] == (1 if d.task == "t2i" else 3) and d.i2v == (d.task == "i2v")
    # the same draw without shift, by hand: t2i on a video uses image_shift, the others shift
    from mugv.diffusion import timestep_shift

    for d0, s in ((d, s) for s, d in enumerate(draws[:64])):
        raw = clip_randomness(7, s // 8, s % 8, video, shift=None, i2v_ratio=i2v, caption_dropout=0.1, t2i_ratio=t2i)
        want = timestep_shift(torch.tensor([raw.t]), 1.0 if d0.task == "t2i" else 2.0).item()
        assert d0.t == pytest.approx(want, rel=1e-5, abs=1e-5)
    # images are always t2i, whatever the mix; t2i_ratio 0 keeps the former draws (i2v or t2v)
    assert all(clip_randomness(7, 0, c, image, shift=None, i2v_ratio=1.0, caption_dropout=0.0).task == "t2i"
               for c in range(50))
    assert {clip_randomness(3, 0, c, video, shift=None, i2v_ratio=0.5, caption_dropout=0.0).task
            for c in range(200)} == {"i2v", "t2v"}
    for bad in ((1.2, 0.0), (0.6, 0.5), (0.2, -0.1)):
        with pytest.raises(ConfigError, match="ratio"):
            check_task_mix(*bad)
    with pytest.raises(ConfigError, match="i2v_loss_weight"):
        check_task_mix(0.1, 0.1, (0.3, 1.0, -1.0))


def test_trainer_draws_tasks_at_their_rates_on_mixed_data(mixed, tmp_path):
    """Through the trainer's own batch path: images are t2i; video clips follow the mix."""
    img, vid = mixed
    tr = Trainer(_cfg(img, tmp_path / "run", data_dirs=[str(img), str(vid)], i2v_ratio=0.25, t2i_ratio=0.25,
                      caption_dropout=0.0))
    videos = [i for i in range(len(tr.data)) if tr.data.latent_shape(i)[1] > 1]
    images = [i for i in range(len(tr.data)) if tr.data.latent_shape(i)[1] == 1]
    assert len(videos) == len(images) == 4
    counts, n = {"t2i": 0, "t2v": 0, "i2v": 0}, 0
    for step in range(150):
        lat, tgt, masks, *_ = tr._batch(tuple(videos + images), step)
        tasks = [task_of(y, m) for y, m in zip(tgt, masks)]
        assert tasks[4:] == ["t2i"] * 4
        for x, y, m, task in zip(lat[:4], tgt[:4], masks[:4], tasks[:4]):
            counts[task] += 1
            n += 1
            assert x.shape == y.shape and m.shape == (x.shape[1],)
            assert (x.shape[1] == 1) == (task == "t2i") and bool(m[0]) == (task != "i2v") and bool(m[1:].all())
    assert _within(counts["i2v"], n, 0.25) and _within(counts["t2i"], n, 0.25) and _within(counts["t2v"], n, 0.5)


def _oracle_loss(tr: Trainer, indices, step: int, weights: dict) -> float:
    """The step's loss from the plain (unpacked) forward of each clip, built here."""
    from mugv.diffusion import shift_ratio

    cfg, sq, count = tr.cfg, 0.0, 0
    with torch.no_grad():
        for i in indices:
            clip = tr.data[i]
            x0 = clip.latent
            T, H, W = x0.shape[1], clip.meta["height"], clip.meta["width"]
            d = clip_randomness(cfg.seed, step, i, tuple(x0.shape), shift=shift_ratio(H, W, T),
                                i2v_ratio=cfg.i2v_ratio, caption_dropout=0.0, t2i_ratio=cfg.t2i_ratio,
                                image_shift=shift_ratio(H, W, 1))
            if d.task == "t2i":
                x0 = x0[:, :1]
            x_t = (1 - d.t) * x0 + d.t * d.noise
            keep = torch.ones(x0.shape[1], dtype=torch.bool)
            if d.task == "i2v":
                x_t[:, 0], keep[0] = x0[:, 0], False
            out = tr.model(x_t[None], torch.tensor([d.t * 1000.0]), clip.text[None], x_mask=keep[None],
                           fps=torch.tensor([clip.meta["fps"]]))[0, :C]
            err = (out - (d.noise - x0)).pow(2)[:, keep]
            sq += weights[d.task] * err.sum().item()
            count += err.numel()
    return sq / count


def test_loss_is_the_task_weighted_combination(mixed, tmp_path):
    img, vid = mixed
    w = {"t2i": 0.3, "t2v": 1.0, "i2v": 0.5}
    tr = Trainer(_cfg(img, tmp_path / "run", data_dirs=[str(img), str(vid)], i2v_ratio=0.4, t2i_ratio=0.3,
                      caption_dropout=0.0, t2i_loss_weight=w["t2i"], t2v_loss_weight=w["t2v"],
                      i2v_loss_weight=w["i2v"], token_budget=400))
    idx = (4, 5, 6, 7, 0, 1)  # four video clips, two images
    step = next(s for s in range(200)  # a step whose draws hold every task, t2i on a video too
                if {task_of(y, m) for y, m in zip(*tr._batch(idx[:4], s)[1:3])} == {"t2i", "t2v", "i2v"})
    tr.step = step
    want = _oracle_loss(tr, idx, step, w)
    res = tr.train_step(idx)
    assert res.loss == pytest.approx(want, rel=1e-5)
    assert sorted(set(res.tasks)) == ["i2v", "t2i", "t2v"] and res.tasks[4:] == ["t2i", "t2i"]
    assert res.task_counts == {k: res.tasks.count(k) for k in ("t2i", "t2v", "i2v")}  # one process: this rank's
    assert TrainConfig().t2i_loss_weight == 0.3 and TrainConfig().t2i_ratio == 0.0
    # the weights enter linearly: with t2i at 0 the loss drops by exactly the t2i part
    tr2 = Trainer(_cfg(img, tmp_path / "run2", data_dirs=[str(img), str(vid)], i2v_ratio=0.4, t2i_ratio=0.3,
                       caption_dropout=0.0, t2i_loss_weight=0.0, t2v_loss_weight=w["t2v"],
                       i2v_loss_weight=w["i2v"], token_budget=400))
    tr2.step = step
    want0 = _oracle_loss(tr2, idx, step, {**w, "t2i": 0.0})
    assert want0 < want and tr2.train_step(idx).loss == pytest.approx(want0, rel=1e-5)


def test_data_weights_are_honored_and_resumable(mixed, tmp_path):
    img, vid = mixed
    mix = LatentMixture([img, vid], [0.8, 0.2])
    assert mix.groups == [0] * 4 + [1] * 4 and mix.weights == pytest.approx([0.8, 0.2])
    sizes = [10] * 8
    s = PackingSampler(sizes, 40, seed=3, groups=mix.groups, group_weights=mix.weights)
    drawn = [c for e in range(60) for c in s.order(e)]
    n = len(drawn)
    assert _within(sum(mix.groups[c] == 0 for c in drawn), n, 0.8)
    # within a directory, each clip in turn (every clip of the small group appears)
    assert {c for c in drawn if c >= 4} == {4, 5, 6, 7}
    assert s.order(5) == PackingSampler(sizes, 40, seed=3, groups=mix.groups, group_weights=mix.weights).order(5)
    assert s.order(5) != s.order(6) and s.order(5) != PackingSampler(sizes, 40, seed=4, groups=mix.groups,
                                                                     group_weights=mix.weights).order(5)
    # resumable: a sampler restored mid-epoch continues with the same steps
    a = PackingSampler(sizes, 40, num_replicas=2, rank=1, seed=3, groups=mix.groups, group_weights=mix.weights)
    steps = [a.next_step().per_rank for _ in range(7)]
    b = PackingSampler(sizes, 40, num_replicas=2, rank=1, seed=3, groups=mix.groups, group_weights=mix.weights)
    for _ in range(3):
        b.next_step()
    c = PackingSampler(sizes, 40, num_replicas=2, rank=1, seed=3, groups=mix.groups, group_weights=mix.weights)
    c.load_state_dict(b.state_dict())
    assert [c.next_step().per_rank for _ in range(4)] == steps[3:]
    other = PackingSampler(sizes, 40, num_replicas=2, rank=1, seed=3, groups=mix.groups, group_weights=[0.5, 0.5])
    with pytest.raises(ConfigError, match="group_weights"):
        other.load_state_dict(b.state_dict())
    # a zero weight: that directory is never drawn
    z = PackingSampler(sizes, 40, seed=3, groups=mix.groups, group_weights=[0.0, 1.0])
    assert all(c >= 4 for e in range(5) for st in z.plan(e) for b_ in st for c in b_)
    # the trainer's sampler: weights from the config
    tr = Trainer(_cfg(img, tmp_path / "run", data_dirs=[str(img), str(vid)], data_weights=[3.0, 1.0]))
    assert tr.sampler.group_weights == pytest.approx([0.75, 0.25]) and tr.sampler.groups == mix.groups
    with pytest.raises(ConfigError, match="one weight per data directory"):
        LatentMixture([img, vid], [1.0])
    with pytest.raises(ConfigError, match="not all 0"):
        LatentMixture([img, vid], [0.0, 0.0])
    with pytest.raises(ConfigError, match="data_weights needs data_dirs"):
        Trainer(_cfg(img, tmp_path / "x", data_weights=[1.0]))
    with pytest.raises(ConfigError, match="positive weight but no clips"):
        PackingSampler(sizes[:4], 40, groups=[0] * 4, group_weights=[1.0, 1.0])


def test_buckets_filter_clips(mixed, tmp_path):
    img, vid = mixed
    assert parse_bucket("1x*x*") == ((1, 1), None, None)
    assert parse_bucket("9-17x32X48") == ((9, 17), (32, 32), (48, 48))
    only_images = LatentMixture([img, vid], [0.5, 0.5], ["1x*x*", "9x32x48"])
    assert len(only_images) == 5 and only_images.groups == [0, 0, 0, 0, 1]
    assert [only_images.latent_shape(i)[1] for i in range(5)] == [1, 1, 1, 1, 2]
    # videos of 17 frames (3 latent frames) at 32 px high, and the 9-frame ones of any size
    some = LatentDataset(vid, buckets=["17x32x*", "9x*x*"])
    want = [i for i, (T, h, w) in enumerate(VIDEOS) if (T == 3 and h == 4) or T == 2]
    assert [e[1]["key"] for e in some.entries] == [str(i) for i in want]
    for bad in ("1x*", "ax1x1", "5-2x*x*", "0x*x*"):
        with pytest.raises(ConfigError, match="bucket"):
            parse_bucket(bad)
    with pytest.raises(ConfigError, match="matches the buckets"):
        LatentMixture([img, vid], [0.5, 0.5], ["1x*x*"])  # the video directory keeps no clip
    tr = Trainer(_cfg(vid, tmp_path / "run", buckets=["9x*x*"]))  # one directory, filtered
    assert len(tr.data) == 2 and tr.sampler.groups is None


def test_stages_switch_data_and_tasks_and_resume_mid_stage(mixed, tmp_path):
    from mugv.train.stages import stage_configs, train_stages

    img, vid = mixed
    stages = [{"name": "images", "steps": 2, "data": str(img), "buckets": ["1x*x*"]},
              {"name": "mixed", "steps": 3, "data_dirs": [str(img), str(vid)], "data_weights": [0.3, 0.7],
               "i2v_ratio": 0.5, "t2i_ratio": 0.2, "t2i_loss_weight": 0.5}]
    base = dict(checkpoint_every=1, caption_dropout=0.0)
    full = train_stages(_cfg(img, tmp_path / "full", **base), stages)
    assert [r.step for r in full] == [2, 3] and all(math.isfinite(v) for r in full for v in r.losses)
    cfgs = stage_configs(_cfg(img, tmp_path / "full"), stages)
    assert cfgs[1].data_weights == [0.3, 0.7] and cfgs[1].t2i_ratio == 0.2 and cfgs[0].buckets == ["1x*x*"]
    part = train_stages(_cfg(img, tmp_path / "part", **base), stages, stop_after=3)
    assert [r.step for r in part] == [2, 1]  # stopped inside the mixed stage
    resumed = train_stages(_cfg(img, tmp_path / "part", **base), stages)
    assert [r.step for r in resumed] == [3] and resumed[0].losses == full[1].losses  # exact
    from mugv.train.logging import read_metrics

    recs = read_metrics(tmp_path / "full" / "stage_1_mixed" / "train.jsonl")
    assert len(recs) == 3 and all(r["clips_t2i"] + r["clips_t2v"] + r["clips_i2v"] > 0 for r in recs)
    t = Trainer(cfgs[1])
    t.resume()
    assert t.sampler.group_weights == pytest.approx([0.3, 0.7])


def test_preprocess_image_folder(tmp_path):
    from PIL import Image

    from mugv.config import PreprocessConfig
    from mugv.data.preprocess import preprocess
    from mugv.data.shards import LatentDataset
    from mugv.data.video import write_mp4
    from mugv.models.vae import VAEConfig, VideoVAE
    from tests.stack.test_data import _StubText

    torch.manual_seed(0)
    vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).eval()
    root = tmp_path / "media"
    root.mkdir()
    rng = np.random.default_rng(0)
    pixels = {n: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for n in ("a", "b")}
    Image.fromarray(pixels["a"]).save(root / "a.png")
    Image.fromarray(pixels["b"]).save(root / "b.PNG")
    Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(root / "c.jpg", quality=95)
    (root / "broken.png").write_bytes(os.urandom(200))
    write_mp4(rng.integers(0, 256, (9, 48, 48, 3), dtype=np.uint8), root / "v.mp4", fps=8)
    caps = root / "captions.csv"
    caps.write_text("video,caption\n" + "".join(f"{n},caption of {n}\n" for n in
                                                ("a.png", "b.PNG", "c.jpg", "broken.png", "v.mp4")))
    cfg = load_config(PreprocessConfig, overrides=dict(videos=str(root), captions=str(caps), out=str(tmp_path / "sh"),
                                                       base_resolution=48, num_frames=[9], fps=8.0, device="cpu"))
    rep = preprocess(cfg, vae=vae, text_encoder=_StubText(), progress=False)
    assert sorted(Path(p["source"]).name for p in rep["processed"]) == ["a.png", "b.PNG", "c.jpg", "v.mp4"]
    assert [Path(s["source"]).name for s in rep["skipped"]] == ["broken.png"]
    ds = LatentDataset(tmp_path / "sh")
    by_name = {Path(ds[i].meta["source"]).name: ds[i] for i in range(len(ds))}
    for name in ("a.png", "b.PNG", "c.jpg"):
        clip = by_name[name]
        assert clip.latent.shape[:2] == (C, 1) and clip.meta["num_frames"] == 1 and clip.meta["image"] is True
        assert clip.meta["fps"] == 8.0
    assert by_name["v.mp4"].latent.shape[1] == 2 and "image" not in by_name["v.mp4"].meta
    # a 48x48 PNG fills the 48x48 bucket unresized: its latent is the VAE's encoding of the pixels (PIL-decoded)
    x = torch.from_numpy(np.array(Image.open(root / "a.png").convert("RGB"))).permute(2, 0, 1)[:, None]
    x = x.float() / 127.5 - 1.0
    with torch.no_grad():
        want = vae.encode(x[None]).mode()[0]
    torch.testing.assert_close(by_name["a.png"].latent, want, rtol=1e-5, atol=1e-5)
    # the image clips train through the same packed path
    tr = Trainer(_cfg(tmp_path / "sh", tmp_path / "run", steps=1, token_budget=200, buckets=["1x*x*"]))
    assert len(tr.data) == 3 and math.isfinite(tr.fit().losses[0])


def test_curriculum_10b_file_validates():
    import tomllib

    from mugv.models import DiTConfig
    from mugv.train.context_parallel import check_cp_heads
    from mugv.train.stages import stage_configs

    path = REPO / "configs" / "curriculum_10b.toml"
    base = load_config(TrainConfig, path)
    stages = tomllib.loads(path.read_text())["stages"]
    cfgs = stage_configs(base, stages)
    assert [s["name"] for s in stages] == ["images", "360p_2s", "720p_5s"]  # the paper's order
    assert base.flavor == "10b" and all(c.flavor == "10b" for c in cfgs)
    dit = DiTConfig.from_flavor("10b")
    p = dit.patch_size
    for c in cfgs:
        check_task_mix(c.i2v_ratio, c.t2i_ratio, (c.t2i_loss_weight, c.t2v_loss_weight, c.i2v_loss_weight))
        check_cp_heads(dit.num_heads, c.context_parallel)
        assert c.data_dirs and len(c.data_weights) in (0, len(c.data_dirs)) and c.buckets
        for b in c.buckets:  # every bucket's clips fit the packed budget of a context-parallel group
            (f, _), (h, _), (w, _) = parse_bucket(b)
            T = (f - 1) // 8 + 1
            tokens = math.ceil(T / p[0]) * math.ceil(h / 8 / p[1]) * math.ceil(w / 8 / p[2]) + 2
            assert tokens <= c.token_budget * c.context_parallel, (c.out, b, tokens)
    assert all(parse_bucket(b)[0] == (1, 1) for b in cfgs[0].buckets)  # stage 0: images only
    videos = [parse_bucket(b) for b in cfgs[1].buckets + cfgs[2].buckets if parse_bucket(b)[0][0] > 1]
    assert {v[0][0] for v in videos} == {49, 105} and ((105, 105), (720, 720), (1280, 1280)) in videos
    assert cfgs[1].init_from == cfgs[0].out and cfgs[2].init_from == cfgs[1].out
