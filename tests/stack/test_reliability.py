"""Faults: torn and corrupt checkpoints are skipped, a failed write (ENOSPC/EIO) keeps the
earlier checkpoints and stops the run, rotation never deletes the newest valid checkpoint,
metrics survive a SIGKILL and hold no duplicate step after resume, ``mugv train`` killed
anywhere resumes to the bitwise-identical loss sequence, and pickles that run code are refused."""

import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mugv.config import ConfigError, TrainConfig, load_config
from mugv.train import checkpoint as ckpt
from mugv.train.logging import MetricsLogger, read_metrics
from tests.stack.test_train import _cfg, make_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(run, step, model, opt, keep_last=5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ckpt.save_run_state(run, step, model, opt, extra={"tag": step}, keep_last=keep_last)


def _truncate(d):
    f = d / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(d):
    f = d / "__0_0.distcp"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))


def _drop_file(d):
    (d / "extra_rank0.pt").unlink()


def _drop_marker(d):
    (d / ckpt.MARKER).unlink()


def test_checkpoint_has_manifest_and_marker(tmp_path):
    model, opt = _tiny()
    d = _save(tmp_path, 1, model, opt)
    ckpt.verify_checkpoint(d)
    man = json.loads((d / ckpt.MANIFEST).read_text())
    assert set(man["files"]) == {p.name for p in d.iterdir()} - {ckpt.MANIFEST, ckpt.MARKER}
    assert (d / ckpt.MARKER).read_text().strip() == "1"


@pytest.mark.parametrize("damage", [_truncate, _flip, _drop_file, _drop_marker])
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, damage):
    model, opt = _tiny()
    _save(tmp_path, 1, model, opt)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    bad = _save(tmp_path, 2, model, opt)
    damage(bad)
    with pytest.raises(ckpt.CheckpointError, match="step_00000002"):
        ckpt.verify_checkpoint(bad)
    with pytest.warns(RuntimeWarning, match="skipping .*step_00000002"):
        good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step_00000001"
    fresh, fresh_opt = _tiny(seed=1)
    extra = ckpt.load_run_state(good, fresh, fresh_opt)
    assert extra["step"] == 1 and extra["tag"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k])


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    model, opt = _tiny()
    _truncate(_save(tmp_path / "run", 1, model, opt))
    with pytest.warns(RuntimeWarning), pytest.raises(ckpt.CheckpointError, match="none is valid.*refusing"):
        ckpt.latest_checkpoint(tmp_path / "run")
    assert ckpt.latest_checkpoint(tmp_path / "empty") is None  # no run yet: a fresh start is right


def _legacy(d):
    """What a checkpoint written before checkpoints carried a marker looks like."""
    (d / ckpt.MARKER).unlink()
    (d / ckpt.MANIFEST).unlink()


def test_unmarked_checkpoint_refused_unless_trusted(tmp_path):
    model, opt = _tiny()
    d = _save(tmp_path, 3, model, opt)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    _legacy(d)
    with pytest.warns(RuntimeWarning), pytest.raises(
        ckpt.CheckpointError, match=r"step_00000003: no COMPLETE marker and no MANIFEST\.json.*refusing.*"
        r"trust-unverified-checkpoint") as err:
        ckpt.latest_checkpoint(tmp_path)
    assert str(d) in str(err.value)
    with pytest.warns(RuntimeWarning, match=r"resuming from the unverified checkpoint .*step_00000003"):
        got = ckpt.latest_checkpoint(tmp_path, trust_unverified=True)
    assert got == d
    fresh, fresh_opt = _tiny(seed=1)
    assert ckpt.load_run_state(got, fresh, fresh_opt)["tag"] == 3
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    # trusting never overrides a valid checkpoint, nor accepts a truncated one that is merely unmarked
    _save(tmp_path, 2, model, opt)
    with pytest.warns(RuntimeWarning, match="skipping .*step_00000003"):
        assert ckpt.latest_checkpoint(tmp_path, trust_unverified=True).name == "step_00000002"


def test_trainer_resumes_an_unmarked_checkpoint_only_when_told(shards, tmp_path):
    from mugv.train.trainer import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = Trainer(_cfg(shards, tmp_path / "full", steps=3)).fit()
        Trainer(_cfg(shards, tmp_path / "run", steps=3, checkpoint_every=2)).fit(stop_after=2)
    _legacy(tmp_path / "run" / "checkpoints" / "step_00000002")
    with pytest.warns(RuntimeWarning), pytest.raises(ckpt.CheckpointError, match="trust-unverified-checkpoint"):
        Trainer(_cfg(shards, tmp_path / "run", steps=3, checkpoint_every=2)).fit()
    tr = Trainer(_cfg(shards, tmp_path / "run", steps=3, checkpoint_every=2, trust_unverified_checkpoint=True))
    with pytest.warns(RuntimeWarning, match="resuming from the unverified checkpoint .*step_00000002"):
        tr.fit()
    assert tr.step == 3 and tr.losses == full.losses  # the same run as one without the old checkpoint
    ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003")  # what it writes next is verified


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    model, opt = _tiny()
    _save(tmp_path, 1, model, opt)
    real = ckpt._write_durable

    def failing(path, data):  # half the bytes reach the disk, then the device fails
        real(path, data[: len(data) // 2])
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ckpt, "_write_durable", failing)
    with pytest.raises(ckpt.CheckpointWriteError, match=f"step_00000002.*{os.strerror(code)}.*intact.*step_00000001"):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000001"]  # the partial write is gone, the earlier one untouched
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000001")


def test_disk_full_stops_the_run(shards, tmp_path, monkeypatch):
    from mugv.train.trainer import Trainer

    real = ckpt._write_durable

    def failing(path, data):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_durable", failing)
    tr = Trainer(_cfg(shards, tmp_path, steps=6, checkpoint_every=2, keep_last=1))
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left"):
        tr.fit()
    assert tr.step == 4  # stopped at the failed checkpoint, did not train on
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"


def test_rotation_keeps_the_newest_valid(tmp_path):
    model, opt = _tiny()
    for s in (1, 2, 3):
        _save(tmp_path, s, model, opt, keep_last=2)
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    _drop_marker(tmp_path / "checkpoints" / "step_00000003")  # e.g. a half-deleted or torn one
    _save(tmp_path, 4, model, opt, keep_last=2)
    # keep_last counts valid checkpoints: step 2 stays, the invalid step 3 goes
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000004"]
    _save(tmp_path, 5, model, opt, keep_last=1)
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000005"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickles_are_refused(tmp_path):
    from mugv.models import UnsafePickleError, read_state_dict

    marker = tmp_path / "pwned"
    model, opt = _tiny()
    d = _save(tmp_path / "run", 1, model, opt)
    torch.save({"step": 1, "x": _Evil(marker)}, d / "extra_rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match="refusing to unpickle"):
        ckpt.load_run_state(d, *_tiny())
    import pickle

    (d / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ckpt.CheckpointError, match="refusing its .metadata.*system"):
        ckpt.load_run_state(d, *_tiny())
    with pytest.raises(ckpt.CheckpointError, match="refusing its .metadata"):
        ckpt.load_ema_weights(d, _tiny()[0])
    torch.save({"w": _Evil(marker)}, tmp_path / "w.pt")
    with pytest.raises(UnsafePickleError, match=r"(?s)refusing to load weights file .*w\.pt.*system.*execute "
                       r"code.*convert it to \.safetensors") as err:
        read_state_dict(tmp_path / "w.pt")
    assert isinstance(err.value, pickle.UnpicklingError) and err.value.path.endswith("w.pt")
    assert "weights_only` set to `False`" not in str(err.value)  # never advise unsafe loading
    # config files are data: TOML only, never executed
    (tmp_path / "c.toml").write_text(f"import os\nos.system('touch {marker}')\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(TrainConfig, tmp_path / "c.toml")
    assert not marker.exists()


def test_metrics_flushed_and_deduplicated(tmp_path):
    log = MetricsLogger(tmp_path, 5, tensorboard=False, progress=False, name="t")
    for s in (1, 2, 3):
        log.step(s, 0.1 * s, lr=1e-3)
    assert [r["step"] for r in read_metrics(tmp_path / "t.jsonl")] == [1, 2, 3]  # on disk before close
    log.sync()
    # a kill in the middle of a write leaves a torn last line: tolerated on read
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "t.jsonl")] == [1, 2, 3]
    # a resume from step 2 rewrites the records after it, and the torn line
    log2 = MetricsLogger(tmp_path, 5, tensorboard=False, progress=False, name="t", keep_through=2)
    log2.step(3, 0.7, lr=1e-3)
    log2.close()
    recs = read_metrics(tmp_path / "t.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 0.1), (2, 0.2), (3, 0.7)]
    (tmp_path / "t.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path / "t.jsonl")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def _train(config, out, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ckpt.FAULT_ENV, None)
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "mugv.cli", "train", "--config", str(config), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_kill_anywhere_resumes_bitwise(shards, tmp_path):
    """SIGKILL ``mugv train`` mid-step, mid-rotation and mid-checkpoint-write; every rerun
    resumes, and the final loss sequence equals one uninterrupted run, bit for bit."""
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'data = "{shards}"\nsteps = 6\ncheckpoint_every = 2\nkeep_last = 1\ntoken_budget = 160\n'
        'progress = false\ntensorboard = false\ndepth = 1\nhidden_size = 48\nnum_heads = 1\n'
        'warmup_steps = 2\nlr = 1e-3\nema_decay = 0.9\ndevice = "cpu"\ni2v_ratio = 0.5\ncaption_dropout = 0.2\n'
        "threads = 1\n"
    )
    from mugv.train.trainer import Trainer

    ref = Trainer(load_config(TrainConfig, config, overrides={"out": str(tmp_path / "ref")})).fit()
    want = list(enumerate(ref.losses, start=1))
    assert len(want) == 6

    run = tmp_path / "run"
    jsonl = run / "train.jsonl"
    # (fault point, steps whose records must be on disk after the kill, newest valid checkpoint)
    plan = [("step@3", [1, 2], 2), ("rotation@4", [1, 2, 3, 4], 4), ("checkpoint_write@6", [1, 2, 3, 4, 5, 6], 4)]
    for fault, logged, valid in plan:
        r = _train(config, run, fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
        assert [x["step"] for x in read_metrics(jsonl)] == logged, fault  # no record lost
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ckpt.latest_checkpoint(run).name == f"step_{valid:08d}", fault
    with open(jsonl, "a") as f:
        f.write('{"step": 7, "loss": 0.')  # and a torn last line
    r = _train(config, run)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [(x["step"], x["loss"]) for x in read_metrics(jsonl)]
    assert got == want  # no duplicate step, and exactly equal floats
    assert [d.name for d in ckpt.checkpoint_dirs(run)] == ["step_00000006"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def _copy_shards(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "drop_tensor"])
def test_bad_shard_names_file_and_clip(shards, tmp_path, damage):
    from safetensors.torch import load_file

    from mugv.data.shards import BadClipError, LatentDataset, write_shard

    root = _copy_shards(shards, tmp_path / "d")
    f = root / "shard_0.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])
    elif damage == "garble_header":
        b = bytearray(f.read_bytes())
        b[8:24] = b"\xff" * 16
        f.write_bytes(bytes(b))
    else:
        t = load_file(str(f))
        del t["3.latent"]
        write_shard(f, t)
    ds = LatentDataset(root)
    i = 3
    with pytest.raises(BadClipError, match=r"shard_0\.safetensors, clip '3'"):
        ds[i]
    if damage != "drop_tensor":  # the whole shard is unreadable: every clip is bad
        with pytest.raises(ValueError, match="every clip"):
            LatentDataset(root, skip_bad_clips=True)
        return
    ok = LatentDataset(root, skip_bad_clips=True)
    assert len(ok) == len(ds) - 1 and [b["clip"] for b in ok.bad_clips] == ["3"]
    assert "3" not in [m["key"] for _, m in ok.entries]


def test_flipped_bytes_fail_the_shard_checksum(shards, tmp_path):
    from mugv.data.shards import INDEX, BadClipError, LatentDataset, atomic_write_json, file_sha256, write_shard

    root = _copy_shards(shards, tmp_path / "d")
    index = json.loads((root / INDEX).read_text())
    index["shards"][0]["sha256"] = file_sha256(root / "shard_0.safetensors")
    write_shard(root / "shard_1.safetensors", {"0.latent": torch.zeros(24, 1, 4, 8), "0.text": torch.zeros(2, 384)})
    index["shards"].append({"file": "shard_1.safetensors", "source": "other",
                            "sha256": file_sha256(root / "shard_1.safetensors"),
                            "clips": [{**index["shards"][0]["clips"][3], "key": "0", "text_len": 2}]})
    atomic_write_json(root / INDEX, index)
    assert torch.equal(LatentDataset(root)[0].latent, LatentDataset(shards)[0].latent)
    f = root / "shard_0.safetensors"
    b = bytearray(f.read_bytes())
    b[-5] ^= 0x01  # one bit of a latent value: a silent wrong value without the checksum
    f.write_bytes(bytes(b))
    with pytest.raises(BadClipError, match="shard_0.safetensors.*SHA-256"):
        LatentDataset(root)[0]
    ok = LatentDataset(root, skip_bad_clips=True)
    assert len(ok) == 1 and len(ok.bad_clips) == len(LatentDataset(shards))


def test_skip_bad_clips_in_training(shards, tmp_path):
    from safetensors.torch import load_file

    from mugv.data.shards import write_shard
    from mugv.train.trainer import Trainer

    root = _copy_shards(shards, tmp_path / "d")
    t = load_file(str(root / "shard_0.safetensors"))
    del t["5.text"]
    write_shard(root / "shard_0.safetensors", t)
    with pytest.warns(RuntimeWarning, match="skipped 1 bad clips"):
        tr = Trainer(_cfg(root, tmp_path / "o", skip_bad_clips=True))
    assert len(tr.clip_tokens) == len(tr.data) == 7


@pytest.mark.parametrize("video", ["../secret.mp4", "/etc/passwd", "a/../../b.mp4"])
def test_captions_outside_the_videos_folder_are_refused(tmp_path, video):
    from mugv.data.preprocess import read_captions

    csv = tmp_path / "c.csv"
    csv.write_text(f'video,caption\nok.mp4,"fine"\n{video},"escape"\n')
    with pytest.raises(ValueError, match=r"c\.csv:3: .*outside the videos folder"):
        read_captions(csv)
    csv.write_text('video,caption\nsub/ok.mp4,"fine"\n')
    assert read_captions(csv) == {"ok.mp4": "fine"}


class _Killed(BaseException):
    """Stands for the process dying at that point (nothing after it runs, no cleanup)."""


@pytest.mark.parametrize("where", ["after_shard", "mid_shard"])
def test_preprocess_interrupted_then_rerun_gives_the_same_index(tmp_path, monkeypatch, where):
    import mugv.data.preprocess as pre
    from mugv.config import PreprocessConfig
    from tests.stack.test_data import _StubText, _video_folder

    torch.manual_seed(0)
    from mugv.models.vae import VAEConfig, VideoVAE

    vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).eval()
    caps = _video_folder(tmp_path / "videos")

    def cfg(out):
        return load_config(PreprocessConfig, overrides=dict(
            videos=str(tmp_path / "videos"), captions=str(caps), out=str(out), base_resolution=48,
            num_frames=[9], fps=8.0, device="cpu"))  # fmt: skip

    pre.preprocess(cfg(tmp_path / "full"), vae=vae, text_encoder=_StubText(), progress=False)
    real_json, real_shard = pre.atomic_write_json, pre.write_shard
    shards_written = []

    def shard(path, tensors):
        if not Path(path).name.startswith("shard_"):
            return real_shard(path, tensors)
        if where == "mid_shard" and shards_written:  # the second shard dies half written
            from safetensors.torch import save_file

            save_file(tensors, str(path) + ".tmp")
            tmp = Path(str(path) + ".tmp")
            tmp.write_bytes(tmp.read_bytes()[:100])
            raise _Killed
        shards_written.append(path)
        real_shard(path, tensors)

    def index(path, obj):
        if where == "after_shard" and len(shards_written) == 2 and path.name == "index.json":
            raise _Killed  # the second shard is on disk, the index does not list it yet
        real_json(path, obj)

    monkeypatch.setattr(pre, "write_shard", shard)
    monkeypatch.setattr(pre, "atomic_write_json", index)
    with pytest.raises(_Killed):
        pre.preprocess(cfg(tmp_path / "part"), vae=vae, text_encoder=_StubText(), progress=False)
    monkeypatch.undo()
    rep = pre.preprocess(cfg(tmp_path / "part"), vae=vae, text_encoder=_StubText(), progress=False)
    assert len(rep["resumed"]) == 1 and len(rep["processed"]) == 1
    full = json.loads((tmp_path / "full" / "index.json").read_text())
    part = json.loads((tmp_path / "part" / "index.json").read_text())
    assert part["shards"] == full["shards"]  # same clips, order, metadata and shard checksums
    keys = [(s["source"], c["key"]) for s in part["shards"] for c in s["clips"]]
    assert len(keys) == len(set(keys)) == 3
    assert not list((tmp_path / "part").glob("*.tmp"))  # a half-written shard was rewritten, never listed


def _torchrun(config, out, port, fault=None):
    # a restarted group re-creates its store (with torchrun's shared store, the restarted gloo
    # ranks failed to connect to each other)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop(ckpt.FAULT_ENV, None)
    if fault:
        env[ckpt.FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--monitor-interval", "0.2",
           "-m", "mugv.cli", "train", "--config", str(config), "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dead_rank_restarts_the_group_and_resumes(shards, tmp_path):
    """Rank 1 dies (SIGKILL) at step 3 of the first attempt; torchrun (``--max-restarts 1``)
    restarts both ranks, which resume from the step-2 checkpoint to the losses of a run
    without the failure."""
    from tests.stack.test_train import _free_port

    config = tmp_path / "tiny.toml"
    config.write_text(
        f'data = "{shards}"\nsteps = 4\ncheckpoint_every = 2\nkeep_last = 2\ntoken_budget = 160\n'
        'progress = false\ntensorboard = false\ndepth = 1\nhidden_size = 48\nnum_heads = 1\n'
        'warmup_steps = 2\nlr = 1e-3\nema_decay = 0.9\ndevice = "cpu"\nthreads = 1\n'
    )
    ref = _torchrun(config, tmp_path / "ref", _free_port())
    assert ref.returncode == 0, ref.stderr[-3000:]
    r = _torchrun(config, tmp_path / "run", _free_port(), fault="step@3@1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in r.stderr, r.stderr[-3000:]  # rank 1 died, then a restart
    want = [(x["step"], x["loss"]) for x in read_metrics(tmp_path / "ref" / "train.jsonl")]
    got = [(x["step"], x["loss"]) for x in read_metrics(tmp_path / "run" / "train.jsonl")]
    assert [s for s, _ in want] == [1, 2, 3, 4] and got == want


_PREPROCESS_CHILD = """
import os, signal, sys
from pathlib import Path
import torch
import mugv.data.preprocess as pre
from mugv.config import PreprocessConfig, load_config
from mugv.models.vae import VAEConfig, VideoVAE
from tests.stack.test_data import _StubText

videos, caps, out = sys.argv[1:4]
torch.manual_seed(0)
vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).eval()
real_shard = pre.write_shard

def shard(path, tensors):
    real_shard(path, tensors)
    if Path(path).name.startswith("shard_"):  # dies with the first shard renamed, before the index lists it
        os.kill(os.getpid(), signal.SIGKILL)

pre.write_shard = shard
cfg = load_config(PreprocessConfig, overrides=dict(videos=videos, captions=caps, out=out, base_resolution=48,
                                                   num_frames=[9], fps=8.0, device="cpu"))
pre.preprocess(cfg, vae=vae, text_encoder=_StubText(), progress=False)
"""


def test_preprocess_sigkilled_then_rerun_gives_the_same_index(tmp_path):
    """A real SIGKILL of the process (no cleanup, no exception handlers): the in-process test
    above covers the other kill points."""
    import mugv.data.preprocess as pre
    from mugv.config import PreprocessConfig
    from mugv.models.vae import VAEConfig, VideoVAE
    from tests.stack.test_data import _StubText, _video_folder

    caps = _video_folder(tmp_path / "videos")

    def run(out):
        torch.manual_seed(0)
        vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).eval()
        cfg = load_config(PreprocessConfig, overrides=dict(
            videos=str(tmp_path / "videos"), captions=str(caps), out=str(out), base_resolution=48,
            num_frames=[9], fps=8.0, device="cpu"))  # fmt: skip
        return pre.preprocess(cfg, vae=vae, text_encoder=_StubText(), progress=False)

    run(tmp_path / "full")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _PREPROCESS_CHILD, str(tmp_path / "videos"), str(caps),
                           str(tmp_path / "part")], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(list((tmp_path / "part").glob("shard_*.safetensors"))) == 1  # on disk, not in the index
    index = tmp_path / "part" / "index.json"
    assert not index.exists() or not json.loads(index.read_text())["shards"]
    rep = run(tmp_path / "part")
    full = json.loads((tmp_path / "full" / "index.json").read_text())
    part = json.loads((tmp_path / "part" / "index.json").read_text())
    assert part["shards"] == full["shards"]  # same clips, order, metadata and shard checksums
    keys = [(s["source"], c["key"]) for s in part["shards"] for c in s["clips"]]
    assert len(keys) == len(set(keys)) == 3
    assert not list((tmp_path / "part").glob("*.tmp"))
    assert sorted(p.name for p in (tmp_path / "part").glob("shard_*")) == sorted(s["file"] for s in full["shards"])
    assert len(rep["processed"]) + len(rep["resumed"]) == 2
