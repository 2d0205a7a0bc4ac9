"""NVTX ranges of the stack (off: nothing wrapped; on with MUGV_NVTX=1, in a subprocess:
every DiT block, attention, MLP, VAE stage, training phase and sampling step is named) and
the torch.profiler captures of ``mugv train --profile-steps`` / ``mugv generate --profile``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mugv.config import ConfigError
from mugv.profiling import TorchProfile, nvtx_range, parse_profile_steps

ROOT = Path(__file__).resolve().parents[2]


def test_parse_profile_steps():
    assert parse_profile_steps("10:12") == (10, 12)
    assert parse_profile_steps("") is None
    for bad in ("10", "12:10", "a:b", "1:2:3", "-1:2", "3:3"):
        with pytest.raises(ValueError, match="profile_steps"):
            parse_profile_steps(bad)


def test_ranges_off_by_default_cost_nothing():
    from mugv.models.dit_layers import MLP, CrossAttention, SelfAttention
    from mugv.models.vae import VideoVAE

    if os.environ.get("MUGV_NVTX", "0") not in ("", "0"):
        pytest.skip("MUGV_NVTX is set in this environment")
    assert nvtx_range("a") is nvtx_range("b")  # one shared no-op context manager
    for fn in (SelfAttention.forward, CrossAttention.forward, MLP.forward, VideoVAE.encode, VideoVAE.decode):
        assert not hasattr(fn, "__wrapped_nvtx__")  # the undecorated function itself


PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    pushed = []
    torch.cuda.nvtx.range_push = lambda name: pushed.append(name)
    torch.cuda.nvtx.range_pop = lambda: None
    try:
        import nvtx
        class _Fake:
            def __init__(self, name, **kw): self.name = name
            def __enter__(self): pushed.append(self.name)
            def __exit__(self, *a): return False
        nvtx.annotate = _Fake
    except ImportError:
        pass
    from mugv.config import load_config, TrainConfig
    from mugv.diffusion import RectifiedFlow
    from mugv.models.vae import VAEConfig, VideoVAE
    from mugv.train.trainer import Trainer
    from tests.stack.test_train import make_shards

    tmp = Path(tempfile.mkdtemp())
    data = make_shards(tmp / "shards", n=4)
    cfg = load_config(TrainConfig, overrides=dict(data=str(data), out=str(tmp / "run"), steps=1, token_budget=160,
        progress=False, tensorboard=False, depth=2, hidden_size=48, num_heads=1, device="cpu", ema_decay=0.0))
    Trainer(cfg).fit()
    vae = VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False)
    with torch.no_grad():
        vae.decode(vae.encode(torch.randn(1, 3, 9, 16, 16)).mode())
    RectifiedFlow().sample(lambda x, t, y, **kw: torch.zeros_like(x), (1, 4, 2, 4, 4), None, num_steps=2,
                           guidance_scale=1.0, height=32, width=32, num_frames=9)
    print(json.dumps(pushed))
    """
)


def test_ranges_on_name_every_stage():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["MUGV_NVTX"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    pushed = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("train.data", "train.forward", "train.backward", "train.optimizer", "train.checkpoint",
                 "dit.block.0", "dit.block.1", "dit.self_attn", "dit.cross_attn", "dit.mlp",
                 "vae.encode", "vae.encoder", "vae.decode", "vae.decoder", "sample.step.0", "sample.step.1"):  # fmt: skip
        assert name in pushed, (name, sorted(set(pushed)))
    assert "dit.block.2" not in pushed and "sample.step.2" not in pushed
    # the public ops of mugv_kernels are ranges of their own, inside the blocks
    assert "mugv.ada_layer_norm" in pushed and "mugv.varlen_attention" in pushed


def test_torch_profile_writes_trace_and_table(tmp_path):
    import torch

    with TorchProfile(tmp_path / "p", rows=5) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    trace = json.loads(prof.trace_path.read_text())
    assert trace["traceEvents"]
    assert "aten::mm" in prof.table_path.read_text()
    with pytest.raises(RuntimeError, match="without start"):
        prof.stop()


def test_train_profile_steps_and_generate_profile(tmp_path):
    """``mugv train --profile-steps 1:2`` traces step 1 only; ``mugv generate --profile``
    traces the whole run; a bad window is a ConfigError before training."""
    from mugv.cli import main
    from mugv.config import load_config, TrainConfig
    from mugv.train.trainer import Trainer
    from tests.stack.test_cli import train_tiny_run

    data, run = train_tiny_run(tmp_path, 3, "--profile-steps", "1:2")
    prof = run / "profile" / "rank0"
    events = json.loads((prof / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert any(n and n.startswith("aten::") for n in names)
    assert "Self CPU" in (prof / "top_kernels.txt").read_text()
    with pytest.raises(ConfigError, match="profile_steps"):
        Trainer(load_config(TrainConfig, overrides=dict(data=str(data), out=str(tmp_path / "bad"), profile_steps="5",
                                                        device="cpu")))  # fmt: skip
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a red ball", "--frames", "9", "--height", "16",
                 "--width", "32", "--steps", "1", "--device", "cpu", "--out", str(out), "--profile"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "clip.profile" / "trace.json").read_text())["traceEvents"]
    assert (tmp_path / "clip.profile" / "top_kernels.txt").exists() and out.exists()
