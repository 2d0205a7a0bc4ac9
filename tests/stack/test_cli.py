"""The ``mugv`` CLI: ``--help`` for every command, flags overriding config files, and
``generate`` end to end (T2V and I2V) on a tiny training run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mugv.cli import build_parser, main
from mugv.config import TrainConfig, config_from_args

COMMANDS = ["curate", "preprocess", "train-vae", "train", "generate", "demo"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mugv" in out
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_console_script_help():
    """The installed entry point (``[project.scripts] mugv``) resolves to :func:`mugv.cli.main`."""
    r = subprocess.run([sys.executable, "-m", "mugv.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--token-budget" in r.stdout


def test_flags_override_config_file(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('steps = 7\nlr = 0.5\nflavor = "debug"\nbetas = [0.8, 0.9]\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--lr", "0.25", "--no-tensorboard"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.steps, cfg.lr, cfg.flavor, cfg.betas, cfg.tensorboard) == (7, 0.25, "debug", [0.8, 0.9], False)
    assert cfg.seed == TrainConfig().seed


def test_errors_are_reported_not_raised(tmp_path, capsys):
    code = main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.mp4")])
    assert code == 2 and "checkpoint" in capsys.readouterr().err
    code = main(["preprocess", "--vae", str(tmp_path / "novae"), "--out", str(tmp_path / "s")])
    assert code == 2


def test_input_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mugv train: error:") and "learning_rate" in err and len(err.strip().splitlines()) == 1
    bad.write_text("steps = [")
    assert main(["train", "--config", str(bad)]) == 2 and "not valid TOML" in capsys.readouterr().err
    assert main(["train-vae", "--num-frames", "8", "--out", str(tmp_path / "vae")]) == 2  # checked before any work
    assert "8k+1" in capsys.readouterr().err and not (tmp_path / "vae").exists()
    with pytest.raises(SystemExit) as e:  # a value outside a field's choices: argparse's own usage error
        main(["train", "--device", "gpu"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    import mugv.sample

    for exc in (TypeError, ValueError, RuntimeError):  # anything but our input errors propagates
        def bug(*args, _exc=exc, **kwargs):
            raise _exc("a bug")

        monkeypatch.setattr(mugv.sample, "generate", bug)
        with pytest.raises(exc, match="a bug"):
            main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.mp4")])


def train_tiny_run(tmp_path, steps: int, *extra: str):
    """``mugv train`` of a 1-block DiT for ``steps`` steps on random latents recorded against a
    real (random) compact VAE checkpoint; returns ``(data_dir, run_dir)``."""
    from mugv.models.vae import VAEConfig, VideoVAE
    from tests.stack.test_train import make_shards

    vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False)
    vae.save_pretrained(tmp_path / "vae")
    data = make_shards(tmp_path / "shards", n=4)
    index = json.loads((data / "index.json").read_text())
    index.update(vae=str(tmp_path / "vae"), text_encoder="minilm")
    (data / "index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", str(steps), "--depth", "1",
                 "--hidden-size", "48", "--num-heads", "1", "--token-budget", "160", "--no-progress",
                 "--no-tensorboard", "--device", "cpu", *extra]) == 0  # fmt: skip
    return data, run


def test_generate_t2v_and_i2v(tmp_path):
    """Train a 1-block DiT for 2 steps on random latents recorded against a real (random)
    VAE checkpoint, then sample through the CLI: mp4 + contact sheet, both modes."""
    import av
    from PIL import Image

    _, run = train_tiny_run(tmp_path, steps=2)
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "ref.png")
    for extra, name in (([], "t2v.mp4"), (["--image", str(tmp_path / "ref.png")], "i2v.mp4")):
        out = tmp_path / name
        assert main(["generate", "--checkpoint", str(run), "--prompt", "a red ball", "--frames", "9", "--height",
                     "16", "--width", "32", "--steps", "2", "--device", "cpu", "--out", str(out), *extra]) == 0
        with av.open(str(out)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (16, 32, 3)
        assert out.with_suffix(".png").exists()
