"""Annealed SFT: the constant / cosine / anneal learning-rate schedules, and --init-from
(weights only: a fresh optimizer, EMA and sampler)."""

import pytest
import torch

from mugv.config import ConfigError, TrainConfig
from mugv.train.schedule import lr_at
from tests.stack.test_train import _cfg, make_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedules():
    kw = dict(lr=1.0, warmup=2, total=10, min_ratio=0.1)
    assert [lr_at(s, **kw, schedule="constant") for s in (0, 1, 2, 9, 20)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    # anneal: constant until total - N, then linear to 0 at total
    got = [lr_at(s, **kw, schedule="anneal", anneal_steps=4) for s in range(2, 12)]
    assert got == pytest.approx([1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert lr_at(5, **kw, schedule="anneal") == 1.0  # anneal_steps 0: no decay
    assert lr_at(5, **kw) == lr_at(5, **kw, schedule="cosine")  # the default is unchanged
    assert lr_at(10, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="constant | cosine | anneal"):
        lr_at(3, **kw, schedule="linear")
    with pytest.raises(ValueError, match="anneal_steps"):
        lr_at(3, **kw, schedule="anneal", anneal_steps=-1)
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_init_from_loads_weights_only(tmp_path):
    from mugv.train.trainer import Trainer

    data = make_shards(tmp_path / "shards", n=4)
    src = Trainer(_cfg(data, tmp_path / "src", steps=2))
    src.fit()
    sft = Trainer(_cfg(data, tmp_path / "sft", init_from=str(tmp_path / "src" / "step_2"), steps=3,
                       lr_schedule="anneal", anneal_steps=2, warmup_steps=0, seed=5))
    for (n, p), q in zip(sft.model.named_parameters(), src.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)  # raw weights of the source
        torch.testing.assert_close(sft.ema.shadow[n], p.float(), rtol=0, atol=0)  # EMA restarts at them
    assert not sft.optimizer.state and sft.step == 0 and sft.sampler.state_dict() != src.sampler.state_dict()
    lrs = [sft.train_step(sft.sampler.next_step().indices).lr for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4])  # anneal over the last 2 of 3 steps
    with pytest.raises(ConfigError, match="hidden_size=48, this config has 96"):
        Trainer(_cfg(data, tmp_path / "x", init_from=str(tmp_path / "src"), hidden_size=96, num_heads=2))
    with pytest.raises(FileNotFoundError):
        Trainer(_cfg(data, tmp_path / "x", init_from=str(tmp_path / "missing")))


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_t2i_loss_weight_on_one_frame_clips(tmp_path, weight):
    """Images (one-frame clips) count ``t2i_loss_weight`` times in the loss sum; videos once."""
    from mugv.train.trainer import Trainer

    data = make_shards(tmp_path / "shards", n=5)
    tr = Trainer(_cfg(data, tmp_path / "run", t2i_loss_weight=weight, i2v_ratio=0.0, caption_dropout=0.0))
    idx = (0, 3)  # clip 3 has one latent frame: an image
    assert tr.data.latent_shape(3)[1] == 1 and tr.data.latent_shape(0)[1] > 1
    lat, tgt, masks, texts, ts, fps, _ = tr._batch(idx, 0)
    with torch.no_grad():
        out = tr.model.forward_packed(lat, ts, texts, fps=fps, x_mask=masks)
    sq = [(o[:24] - y).pow(2) for o, y in zip(out, tgt)]
    want = (sq[0].sum() + weight * sq[1].sum()) / (sq[0].numel() + sq[1].numel())
    assert tr.train_step(idx).loss == pytest.approx(want.item(), rel=1e-5)
    assert TrainConfig().t2i_loss_weight == 0.3


def test_stages_switch_and_resume_inside_the_right_stage(tmp_path):
    from mugv.train.stages import stage_configs, train_stages

    a, b = make_shards(tmp_path / "a", n=4, seed=0), make_shards(tmp_path / "b", n=4, seed=1)
    stages = [{"name": "images", "steps": 2, "data": str(a), "lr": 2e-3},
              {"name": "video", "steps": 3, "data": str(b), "lr_schedule": "anneal", "anneal_steps": 2}]
    full = train_stages(_cfg(a, tmp_path / "full", checkpoint_every=1), stages)
    assert [r.step for r in full] == [2, 3]
    cfgs = stage_configs(_cfg(a, tmp_path / "full"), stages)
    assert cfgs[1].init_from == cfgs[0].out and cfgs[1].data == str(b) and cfgs[1].lr_schedule == "anneal"
    assert cfgs[0].out.endswith("stage_0_images") and cfgs[0].lr == 2e-3 and cfgs[1].lr == 1e-3
    part = train_stages(_cfg(a, tmp_path / "part", checkpoint_every=1), stages, stop_after=3)
    assert [r.step for r in part] == [2, 1]  # interrupted inside stage 1
    resumed = train_stages(_cfg(a, tmp_path / "part", checkpoint_every=1), stages)
    assert [r.step for r in resumed] == [3]  # stage 0 is skipped, stage 1 resumes at step 1
    assert resumed[0].losses == full[1].losses  # exactly the uninterrupted stage
    assert train_stages(_cfg(a, tmp_path / "part"), stages) == []
    with pytest.raises(ConfigError, match=r"stages\[1\] \(video\).*learning_rate"):
        stage_configs(_cfg(a, tmp_path / "x"), [stages[0], {"name": "video", "learning_rate": 1}])


def test_train_command_runs_stages_from_the_config_file(tmp_path, capsys):
    from mugv.cli import main

    a = make_shards(tmp_path / "a", n=3)
    f = tmp_path / "run.toml"
    f.write_text(f'steps = 1\ntoken_budget = 160\ndepth = 1\nhidden_size = 48\nnum_heads = 1\ndevice = "cpu"\n'
                 f'tensorboard = false\nprogress = false\nout = "{tmp_path / "run"}"\n\n'
                 f'[[stages]]\nname = "one"\nsteps = 1\ndata = "{a}"\n\n[[stages]]\nname = "two"\nsteps = 1\n'
                 f'data = "{a}"\nlr_schedule = "constant"\n')
    assert main(["train", "--config", str(f)]) == 0
    assert (tmp_path / "run" / "stage_1_two" / "checkpoints" / "step_00000001").is_dir()
    assert main(["train", "--config", str(f)]) == 0 and "every stage is finished" in capsys.readouterr().out
