"""Training stack: resume is bitwise-identical on CPU, two gloo ranks with FSDP2 match one
process on the same global batch, NaN steps are skipped then stop the run, checkpoints are
atomic and rotated, the LR schedule and EMA behave, the config files match the defaults."""

import dataclasses
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mugv.config import (
    ConfigError,
    CurateConfig,
    DemoConfig,
    PreprocessConfig,
    TrainConfig,
    VAETrainConfig,
    load_config,
    repo_config_path,
)
from mugv.data.sampler import PackingSampler
from mugv.data.shards import atomic_write_json, write_shard
from mugv.train import checkpoint as ckpt
from mugv.train.ema import EMA
from mugv.train.schedule import lr_at
from mugv.train.trainer import NonFiniteLossError, Trainer

C, D = 24, 384


def make_shards(root: Path, n: int = 8, seed: int = 0, *, shapes=None, text_lens: int = 5,
                images: bool = False) -> Path:
    """A tiny preprocessed dataset of random latents/captions with mixed latent shapes
    ``(T, h, w)`` (cycled over ``n`` clips); caption lengths ``3 + i % text_lens``. With
    ``images``, one-frame clips are marked as images, as ``preprocess`` writes them."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or [(3, 4, 8), (2, 6, 6), (3, 4, 4), (1, 4, 8), (2, 4, 10)]
    tensors, clips = {}, []
    for i in range(n):
        T, h, w = shapes[i % len(shapes)]
        L = 3 + i % text_lens
        tensors[f"{i}.latent"] = torch.randn(C, T, h, w, generator=g)
        tensors[f"{i}.text"] = torch.randn(L, D, generator=g)
        clips.append({"key": str(i), "latent_shape": [C, T, h, w], "num_frames": 8 * (T - 1) + 1,
                      "height": 8 * h, "width": 8 * w, "fps": 8.0, "start_frame": 0, "caption": f"clip {i}",
                      "text_len": L, "source": "synthetic",
                      **({"image": True} if images and T == 1 else {})})  # fmt: skip
    write_shard(root / "shard_0.safetensors", tensors)
    write_shard(root / "null_text.safetensors", {"text": torch.randn(2, D, generator=g)})
    atomic_write_json(root / "index.json", {
        "version": 1, "latent_channels": C, "text_dim": D, "text_encoder": "synthetic", "vae": "",
        "shards": [{"file": "shard_0.safetensors", "source": "synthetic", "clips": clips}],
    })  # fmt: skip
    return root


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), steps=4, token_budget=160, progress=False, tensorboard=False,
                depth=1, hidden_size=48, num_heads=1, warmup_steps=2, lr=1e-3, ema_decay=0.9, device="cpu", i2v_ratio=0.5, caption_dropout=0.2)
    base.update(kw)
    return load_config(TrainConfig, overrides=base)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_resume_is_bitwise_identical(shards, tmp_path):
    full = Trainer(_cfg(shards, tmp_path / "a")).fit()
    part = Trainer(_cfg(shards, tmp_path / "b", checkpoint_every=2, keep_last=2)).fit(stop_after=2)
    assert part.step == 2 and len(part.losses) == 2
    resumed = Trainer(_cfg(shards, tmp_path / "b", checkpoint_every=2, keep_last=2)).fit()
    assert resumed.step == 4
    assert resumed.losses == full.losses  # exact float equality
    assert all(math.isfinite(v) for v in full.losses)
    dirs = ckpt.checkpoint_dirs(tmp_path / "b")
    assert [d.name for d in dirs] == ["step_00000002", "step_00000004"]  # keep_last=2
    assert not list((tmp_path / "b" / "checkpoints").glob("*.tmp"))
    # the EMA / raw weights of the final checkpoint load into a plain model
    from mugv.models import MUGDiT

    tr = Trainer(_cfg(shards, tmp_path / "b"))
    model = MUGDiT(tr.dit_cfg, kernels=False)
    ckpt.load_ema_weights(dirs[-1], model, use_ema=True)
    ema = {k: v for k, v in tr.ema.state_dict().items()}
    tr.resume()
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, tr.ema.state_dict()[k], rtol=0, atol=0)
    assert ema.keys() == tr.ema.state_dict().keys()


def test_nan_steps_are_skipped_then_stop(shards, tmp_path):
    tr = Trainer(_cfg(shards, tmp_path / "n", max_bad_steps=2))
    idx = tr.sampler.next_step().indices
    ok = tr.train_step(idx)
    assert not ok.skipped and math.isfinite(ok.loss) and ok.grad_norm > 0
    assert ok.lr == lr_at(0, lr=1e-3, warmup=2, total=4, min_ratio=0.1)
    assert ok.tokens == [tr.clip_tokens[i] for i in idx] and len(ok.text_tokens) == len(idx)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.data[0].latent  # load
    tr.data._shards["shard_0.safetensors"] = {
        k: (torch.full_like(v, float("nan")) if k.endswith(".latent") else v)
        for k, v in tr.data._shards["shard_0.safetensors"].items()
    }
    res = tr.train_step(tr.sampler.next_step().indices)
    assert res.loss is None and res.skipped
    assert tr.skipped == 1 and tr.step == 2
    for p, q in zip(tr.model.parameters(), before):
        assert torch.equal(p, q)  # no update
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        tr.train_step(tr.sampler.next_step().indices)


def test_meta_init_threshold(shards, tmp_path, monkeypatch):
    """Models over ``meta_init_threshold`` parameters are built on the meta device; the default is 2e9."""
    import mugv.train.trainer as trainer_mod

    seen = []
    real = trainer_mod.build_model

    def spy(factory, **kw):
        seen.append(kw["on_meta"])
        return real(factory, **kw)

    monkeypatch.setattr(trainer_mod, "build_model", spy)
    assert TrainConfig().meta_init_threshold == 2e9
    a = Trainer(_cfg(shards, tmp_path / "a"))
    b = Trainer(_cfg(shards, tmp_path / "b", meta_init_threshold=0))
    assert seen == [False, True]
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):  # same init either way
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank, world, port, data, out, steps, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        tr = Trainer(_cfg(data, out, fsdp="on", activation_checkpointing="full"))
        assert tr.use_fsdp
        losses = [tr.train_step(tr.sampler.next_step().indices).loss for _ in range(steps)]
        if rank == 0:
            q.put(losses)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_two_ranks_match_one_process(shards, tmp_path):
    steps, world = 3, 2
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_fsdp_worker, args=(world, _free_port(), str(shards), str(tmp_path / "f"), steps, q),
                       nprocs=world, join=True, start_method="spawn")
    fsdp_losses = q.get(timeout=5)
    # one process, same global batches (the union of the two ranks' clips), no FSDP, no checkpointing
    tr = Trainer(_cfg(shards, tmp_path / "s"))
    plan = PackingSampler(tr.clip_tokens, 160, num_replicas=world, seed=0)
    single = []
    for _ in range(steps):
        st = plan.next_step()
        single.append(tr.train_step(tuple(c for b in st.per_rank for c in b)).loss)
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(single), rtol=1e-4, atol=1e-5)


def test_lr_schedule():
    kw = dict(lr=1.0, warmup=4, total=20, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.25)
    assert lr_at(3, **kw) == pytest.approx(1.0)
    assert lr_at(20, **kw) == pytest.approx(0.1)
    vals = [lr_at(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_ema_update_and_errors():
    m = torch.nn.Linear(3, 2)
    e = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(1.0)
    w0 = e.shadow["weight"].clone()
    e.update(m, step=100)  # decay min(0.5, 101/110) = 0.5
    torch.testing.assert_close(e.shadow["weight"], 0.5 * w0 + 0.5 * m.weight.detach())
    assert e.decay_at(0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay"):
        EMA(m, 1.0)


@pytest.mark.parametrize("stage,cls", [("preprocess", PreprocessConfig), ("train_vae", VAETrainConfig),
                                       ("train", TrainConfig), ("demo", DemoConfig), ("curate", CurateConfig)])
def test_config_files_document_every_default(stage, cls):
    import tomllib

    path = repo_config_path(stage)
    assert path is not None, f"configs/{stage}.toml missing"
    data = tomllib.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(data) == names, f"configs/{stage}.toml keys differ from {cls.__name__}"
    assert load_config(cls, path) == cls()  # the file states exactly the defaults
    text = path.read_text()
    for name in names:  # every key has a comment line above it
        i = text.index(f"\n{name} =")
        assert text[:i].rstrip().splitlines()[-1].lstrip().startswith("#"), name


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 1e-3\nlearning_rate = 2\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(TrainConfig, bad)
    with pytest.raises(TypeError, match="steps"):
        load_config(TrainConfig, overrides={"steps": "many"})
    assert load_config(TrainConfig, overrides={"lr": 2, "steps": None}).lr == 2.0
    with pytest.raises(ConfigError, match=r"fsdp: expected auto \| on \| off"):
        TrainConfig(fsdp="sometimes")
    with pytest.raises(ConfigError, match="device"):
        load_config(PreprocessConfig, overrides={"device": "gpu"})


def test_parallelize_and_dtype_errors():
    from mugv.train.parallelize import parallelize_dit, resolve_dtype

    with pytest.raises(TypeError, match="blocks"):
        parallelize_dit(torch.nn.Linear(2, 2), fsdp=False)
    m = torch.nn.Module()
    m.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize_dit(m, fsdp=True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_metrics_logger_and_flops(tmp_path):
    import json

    from mugv.train.logging import MetricsLogger, dit_train_flops

    # 6 N per token for the linears + 12 * depth * hidden * (L^2 + L S) per clip for attention
    assert dit_train_flops(1000, 2, 8, [10, 4], [3, 5]) == 6 * 1000 * 14 + 12 * 2 * 8 * (100 + 30 + 16 + 20)
    log = MetricsLogger(tmp_path, 3, tensorboard=True, progress=False, name="t")
    m = log.step(1, 0.5, lr=1e-3, grad_norm=2.0, tokens=100, flops=1e9)
    log.close()
    assert "mfu" not in m  # no device peak on CPU
    assert m["tokens_per_s"] > 0 and m["memory_gib"] > 0
    rec = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert rec["loss"] == 0.5 and rec["grad_norm"] == 2.0
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events written


def test_checkpointed_compiled_blocks_match_plain():
    """Activation checkpointing + per-block compile (aot_eager) change nothing numerically."""
    from mugv.models import DiTConfig, MUGDiT
    from mugv.train.parallelize import parallelize_dit

    cfg = DiTConfig.from_flavor("tiny", depth=2, hidden_size=48, num_heads=1, text_dim=16)
    torch.manual_seed(0)
    plain = MUGDiT(cfg, kernels=False)
    wrapped = MUGDiT(cfg, kernels=False)
    wrapped.load_state_dict(plain.state_dict())
    parallelize_dit(wrapped, fsdp=False, activation_checkpointing=True, compile=True, compile_backend="aot_eager")
    x = [torch.randn(C, 2, 4, 6), torch.randn(C, 1, 4, 4)]
    args = (torch.tensor([300.0, 700.0]), [torch.randn(3, 16), torch.randn(5, 16)])
    outs = []
    for m in (plain, wrapped):
        out = m.forward_packed(x, *args, fps=torch.tensor([8.0, 8.0]))
        sum(o.square().mean() for o in out).backward()
        outs.append((out, {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()}))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][n], rtol=1e-4, atol=1e-6, msg=n)
