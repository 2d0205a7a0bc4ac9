"""Parallel sampling on CPU/gloo: Ulysses context parallelism (cp = 2), CFG-parallel and both
together (2 x 2) give the latents of one process through the same pipeline (the released
layout, text-to-video and image-to-video), the same on every rank; rank 0 alone writes the
video; the CP hooks under ``torch.compile`` (aot_eager) give the one-process forward and
gradients; the errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from mugv.config import ConfigError
from mugv.pipeline import MUGVPipeline
from tests.stack._dist import free_port, start_ranks
from tests.stack._fake_t5 import PROMPT, FakeT5

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(height=16, width=32, num_frames=9, steps=2, seed=7, progress=False, output="latents")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 latents of about unit size, after 2 steps
#: ``(context_parallel, cfg_parallel)`` per world size
RUNS = {2: [(2, False), (1, True)], 4: [(2, True)]}


def _pipe(d) -> MUGVPipeline:
    return MUGVPipeline.from_released(d, text_encoder=FakeT5(), device="cpu", dtype=torch.float32, kernels=False)


#: the compile check: a one-block DiT of the training tests, on clips 0, 1 and 3 (3 is image-to-video)
COMPILE_CLIPS = [0, 1, 3]


def _compile_model():
    from tests.stack.test_context_parallel import CFG, DiTConfig, MUGDiT

    torch.manual_seed(0)
    m = MUGDiT(DiTConfig.from_flavor("tiny", **{**CFG, "depth": 1}), kernels=False)
    with torch.no_grad():  # non-zero output layers, so every gradient is non-trivial
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def _loss_and_grads(model):
    from tests.stack.test_context_parallel import _clips, _sq_err

    sq, count = _sq_err(model, COMPILE_CLIPS, _clips())
    loss = sq / count
    loss.backward()
    return loss.item(), {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}


def _compile_check():
    """cp = 2, the block compiled (aot_eager, the hooks and the all-to-alls inside the compiled
    call): the loss on every rank, and the gradients summed over the group / cp (each rank's
    local gradient is cp times its share's, see mugv.train.context_parallel)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mugv.train.parallelize import parallelize_dit

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model = parallelize_dit(_compile_model(), fsdp=False, compile=True, compile_backend="aot_eager", cp_mesh=mesh)
    loss, grads = _loss_and_grads(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= 2
    return loss, grads


def _worker(rank, world, port, d, image, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("error", message=".*deprecated")  # no deprecated collective or mesh API on our path
    import torch.distributed as dist

    from mugv.models import DiTConfig, MUGDiT
    from mugv.sample import generate_released
    from mugv.train.parallelize import parallelize_for_sampling

    dist.init_process_group("gloo")
    try:
        res = {}
        for cp, cfg_par in RUNS[world]:
            for i2v in (False, True):
                pipe = _pipe(d)
                par = parallelize_for_sampling(pipe.dit, context_parallel=cp, cfg_parallel=cfg_par)
                res[cp, cfg_par, i2v] = pipe(PROMPT, image=image if i2v else None, **KW)
                par.remove()
        if world == 2:
            with torch.device("meta"):  # 3 heads: cp = 2 is refused before any mesh is built
                three = MUGDiT(DiTConfig.from_flavor("tiny", depth=1, hidden_size=72, num_heads=3), kernels=False)
            try:
                parallelize_for_sampling(three, context_parallel=2)
            except ValueError as e:
                res["heads_error"] = str(e)
            g = generate_released(d, PROMPT, os.path.join(out, "clip.mp4"), text_encoder=FakeT5(), frames=9,
                                  height=16, width=32, steps=2, cfg=4.0, seed=7, device="cpu", progress=False,
                                  cfg_parallel=True)
            res["video"] = g.video
            res["compile"] = _compile_check()
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(world, d, image, tmp_path):
    """``world`` gloo ranks forked from one forkserver that has imported this module (torch and
    mugv once for all ranks and both worlds; the server itself runs no torch op or thread)."""
    out = tmp_path / f"world{world}"
    out.mkdir()
    start_ranks(_worker, (world, free_port(), str(d), str(image), str(out)), world)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released-layout directory of the pipeline tests (imported here only: the spawned
    ranks import this module and need none of the public reference code)."""
    from tests.stack.test_pipeline import write_released

    d = tmp_path_factory.mktemp("released")
    write_released(d)
    return (d,)


@pytest.fixture(scope="module")
def single(released, tmp_path_factory):
    """One-process latents (t2v, i2v) of the pipeline and the reference image."""
    from tests.stack.test_pipeline import _image

    image = _image(tmp_path_factory.mktemp("img"))
    pipe = _pipe(released[0])
    return image, {i2v: pipe(PROMPT, image=image if i2v else None, **KW) for i2v in (False, True)}


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_sampling_matches_one_process(released, single, tmp_path, world):
    image, ref = single
    out, ranks = _run(world, released[0], image, tmp_path)
    for cp, cfg_par in RUNS[world]:
        for i2v in (False, True):
            for r, res in enumerate(ranks):
                torch.testing.assert_close(res[cp, cfg_par, i2v], ref[i2v], **TOL,
                                           msg=lambda m: f"cp={cp} cfg_parallel={cfg_par} i2v={i2v} rank {r}: {m}")
            assert all(torch.equal(res[cp, cfg_par, i2v], ranks[0][cp, cfg_par, i2v]) for res in ranks)
    assert (ref[True] - ref[False]).abs().max() > 1e-2  # i2v really conditions on the image
    if world == 2:
        assert "num_heads=3 is not divisible by cp=2" in ranks[0]["heads_error"]
        # rank 0 writes the mp4 and its contact sheet, rank 1 nothing
        assert ranks[0]["video"] == str(out / "clip.mp4") and ranks[1]["video"] is None
        assert sorted(p.name for p in out.iterdir() if p.suffix != ".pt") == ["clip.mp4", "clip.png"]
        ref_loss, ref_grads = _loss_and_grads(_compile_model())
        for loss, grads in (ranks[0]["compile"], ranks[1]["compile"]):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            for n, g in ref_grads.items():
                assert g.abs().sum() > 0, n
                torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"compiled cp=2 {n}: {m}")


def test_parallel_sampling_errors(released, monkeypatch, capsys):
    from mugv.cli import main
    from mugv.sample import generate_released
    from mugv.train.parallelize import build_sampling_mesh

    d = released[0]
    kw = dict(text_encoder=FakeT5(), frames=9, height=16, width=32, steps=1, device="cpu", progress=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="launch torchrun --nproc-per-node 4"):
        generate_released(d, PROMPT, "x.mp4", context_parallel=2, cfg_parallel=True, **kw)
    with pytest.raises(ConfigError, match="needs --cfg != 1"):
        generate_released(d, PROMPT, "x.mp4", cfg_parallel=True, cfg=1.0, **kw)
    with pytest.raises(ConfigError, match="must be >= 1"):
        generate_released(d, PROMPT, "x.mp4", context_parallel=0, **kw)
    with pytest.raises(ConfigError, match=r"--context-parallel 2 x --cfg-parallel \(2\) = 4 ranks, but the world "
                                          r"size is 2"):
        build_sampling_mesh(2, context_parallel=2, cfg_parallel=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 ranks but without --context-parallel or --cfg-parallel"):
        generate_released(d, PROMPT, "x.mp4", **kw)
    monkeypatch.delenv("WORLD_SIZE")
    capsys.readouterr()
    assert main(["generate", "--released", str(d), "--prompt", PROMPT, "--context-parallel", "2", "--device", "cpu",
                 "--out", "x.mp4"]) == 2
    assert "launch torchrun --nproc-per-node 2" in capsys.readouterr().err
