"""Preference optimization: the DPO loss is log 2 at step 0, DPO on synthetic pairs (preferred
from one distribution, rejected from another) raises the implicit reward margin and lowers the
policy's flow loss on preferred clips relative to rejected ones; two gloo ranks (FSDP2, and
Ulysses context parallelism) match one process; KTO runs; bad pair files."""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mugv.config import ConfigError, DPOConfig, load_config
from mugv.data.shards import atomic_write_json, write_shard
from mugv.train.dpo import DPOTrainer, dpo_loss, kto_loss
from tests.stack._dist import free_port, start_ranks
from tests.stack.test_train import _cfg

pytestmark = pytest.mark.usefixtures("one_thread")
C, D, P = 24, 384, 4
#: latent (T, h, w) of each pair for the context-parallel run: 10, 14, 14 and 6 tokens a clip,
#: so the two shares of a step's packed pairs can cut a clip
CP_SHAPES = [(2, 4, 4), (3, 4, 4), (2, 4, 6), (1, 4, 4)]


def _pair_shards(root, shapes=((2, 4, 4),) * P):
    """``P`` pairs (``w<i>``, ``l<i>``: one caption, latents of ``shapes[i]``), ``pairs.csv`` and ``labels.csv``."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors, clips = {}, []
    for i, (T, h, w) in enumerate(shapes):
        text = torch.randn(4, D, generator=g)
        for kind, mean in (("w", 1.0), ("l", -1.0)):  # preferred around +1, rejected around -1
            k = f"{kind}{i}"
            tensors[f"{k}.latent"] = mean + 0.3 * torch.randn(C, T, h, w, generator=g)
            tensors[f"{k}.text"] = text.clone()
            clips.append({"key": k, "latent_shape": [C, T, h, w], "num_frames": 8 * (T - 1) + 1, "height": 8 * h,
                          "width": 8 * w, "fps": 8.0, "start_frame": 0, "caption": f"prompt {i}", "text_len": 4,
                          "source": "synthetic"})
    write_shard(root / "shard_0.safetensors", tensors)
    write_shard(root / "null_text.safetensors", {"text": torch.randn(2, D, generator=g)})
    atomic_write_json(root / "index.json", {"version": 1, "latent_channels": C, "text_dim": D, "text_encoder": "x",
                                            "vae": "", "shards": [{"file": "shard_0.safetensors", "clips": clips}]})
    (root / "pairs.csv").write_text("prompt,preferred,rejected\n" + "".join(f"prompt {i},w{i},l{i}\n" for i in range(P)))
    (root / "labels.csv").write_text("key,label\n" + "".join(f"w{i},1\nl{i},0\n" for i in range(P)))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mugv.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("dpo")
    data = _pair_shards(tmp / "shards")
    Trainer(_cfg(data, tmp / "sft", steps=1)).fit()
    return tmp, data


@pytest.fixture(scope="module")
def cp_setup(setup):
    """Pairs of :data:`CP_SHAPES` and a one-step SFT run of a 2-head DiT (cp=2 splits the heads)."""
    from mugv.train.trainer import Trainer

    tmp, data = setup
    Trainer(_cfg(data, tmp / "sft_h2", steps=1, num_heads=2)).fit()
    return _pair_shards(tmp / "shards_cp", CP_SHAPES), tmp / "sft_h2"


def _dpo(tmp, data, out, **kw):
    base = dict(_cfg(data, tmp / out).__dict__)
    base.update(init_from=str(tmp / "sft"), pairs=str(data / "pairs.csv"), lr=2e-3, warmup_steps=0,
                lr_schedule="constant", pairs_per_step=P, steps=8, checkpoint_every=0, grad_clip=0.0)
    base.update(kw)
    return load_config(DPOConfig, overrides=base)


def test_losses_by_hand():
    e_w, e_l = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    loss, inside = dpo_loss(e_w, e_l, e_w, e_l, beta=10.0)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))  # policy == reference
    loss, inside = dpo_loss(e_w - 0.01, e_l, e_w, e_l, beta=10.0)
    torch.testing.assert_close(inside, torch.full((2,), 0.05))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.full((2,), 0.05)))
    loss, r = kto_loss(torch.tensor([0.9, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([True, False]), beta=2.0)
    torch.testing.assert_close(r, torch.tensor([0.1, 0.0]))  # z = mean r = 0.05
    torch.testing.assert_close(loss, torch.tensor([1 - 1 / (1 + math.exp(-0.05)), 1 - 1 / (1 + math.exp(-0.05))]))


def test_dpo_prefers_the_preferred_distribution(setup):
    tmp, data = setup
    tr = DPOTrainer(_dpo(tmp, data, "dpo"))
    rows = tuple(range(P))
    _, before = tr.preference_loss(rows, step=10**6, grad=False)
    assert before["margin"] == 0.0  # policy == reference
    res = tr.train_step(tr.sampler.next_step().indices)
    assert res.loss == pytest.approx(math.log(2), rel=1e-6, abs=1e-7)  # step 0: log 2
    for _ in range(7):
        tr.train_step(tr.sampler.next_step().indices)
    _, after = tr.preference_loss(rows, step=10**6, grad=False)
    assert after["margin"] > 0.1 and after["accuracy"] == 1.0
    assert after["flow_w"] - after["flow_l"] < before["flow_w"] - before["flow_l"]
    for p in tr.reference.parameters():
        assert not p.requires_grad and p.grad is None


def test_kto_runs_and_bad_pairs(setup, tmp_path):
    tmp, data = setup
    tr = DPOTrainer(_dpo(tmp, data, "kto", loss="kto", pairs=str(data / "labels.csv"), steps=2, pairs_per_step=3))
    r = tr.fit()
    assert r.step == 2 and all(math.isfinite(v) for v in r.losses)
    assert r.losses[0] == pytest.approx(0.5, abs=1e-6)  # r = z = 0 at step 0: 1 - sigmoid(0)
    with pytest.raises(ConfigError, match="init-from"):
        DPOTrainer(_dpo(tmp, data, "x", init_from=""))
    with pytest.raises(ConfigError, match="prompt,preferred,rejected"):
        DPOTrainer(_dpo(tmp, data, "x", pairs=str(data / "labels.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,preferred,rejected\np,w0,nope\n")
    with pytest.raises(ConfigError, match="'nope' not in the data"):
        DPOTrainer(_dpo(tmp, data, "x", pairs=str(bad)))
    (tmp_path / "v.mp4").write_bytes(b"")
    bad.write_text("prompt,preferred_path,rejected_path\np,v.mp4,v.mp4\n")  # synthetic shards: no VAE recorded
    with pytest.raises(ConfigError, match="no preprocess settings"):
        DPOTrainer(_dpo(tmp, data, "x", pairs=str(bad)))


def _two_steps(tr):
    """Step 0 through ``train_step``, then the loss and the full gradients of step 1 (policy !=
    reference there): ``(loss_0, loss_1, {name: grad})``, global means under a process group."""
    loss0 = tr.train_step(tr.sampler.next_step().indices).loss
    loss, _ = tr.preference_loss(tr.sampler.next_step().indices, tr.step)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss1 = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss1)
        loss1 /= dist.get_world_size()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in tr.model.named_parameters()}
    return loss0, loss1.item(), grads


def _dist_dpo_worker(rank, world, port, tmp, data, result, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from mugv.train.context_parallel import UlyssesBatch

    exchanges = []  # token -> head all-to-alls of the Ulysses self-attention, policy and reference
    to_heads = UlyssesBatch._to_heads
    UlyssesBatch._to_heads = lambda self, t: exchanges.append(t.shape) or to_heads(self, t)
    try:
        tr = DPOTrainer(_dpo(Path(tmp), Path(data), f"dist_{kw.get('context_parallel', 1)}", fsdp="on", **kw))
        assert tr.use_fsdp
        out = _two_steps(tr)
        pol = dict(tr.model.named_parameters())
        ref = [(n, isinstance(p, DTensor), p.requires_grad, p.grad is None,
                isinstance(p, DTensor) and p.placements == pol[n].placements and p.device_mesh == pol[n].device_mesh,
                p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel())
               for n, p in tr.reference.named_parameters()]
        if rank == 0:  # a file: tensors through a Queue need the sender alive
            torch.save((out, ref, (tr.dims.dp, tr.dims.cp), len(exchanges)), result)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["fsdp", "cp"])
def test_dpo_two_ranks_match_one_process(setup, request, layout):
    """2 gloo ranks, policy and reference both FSDP2-sharded (over dp_shard x cp): ``fsdp``
    (dp=2, each rank half of the rows) and ``cp`` (Ulysses cp=2, dp=1: both ranks read the same
    rows, each holds half of the packed tokens, a clip cut between the shares). The losses of
    step 0 and 1 and every gradient of step 1 equal one process's on the same global rows
    (fp32); the reference's parameters are DTensors sharded like the policy's, frozen, without
    grads, and under cp both models' self-attention runs through the all-to-alls."""
    from mugv.train.context_parallel import shard_range

    tmp, data = setup
    world = 2
    if layout == "cp":
        data, sft = request.getfixturevalue("cp_setup")
        single_kw = dict(init_from=str(sft), num_heads=2, pairs_per_step=3)
        kw = dict(single_kw, context_parallel=2)
    else:
        single_kw, kw = {}, dict(pairs_per_step=P // world)
    result = tmp / f"{layout}_result.pt"
    start_ranks(_dist_dpo_worker, (world, free_port(), str(tmp), str(data), str(result), kw), world)
    (f0, f1, fgrads), ref, (dp, cp), exchanges = torch.load(result)
    single = DPOTrainer(_dpo(tmp, data, f"single_{layout}", **single_kw))
    if layout == "cp":
        assert (dp, cp) == (1, 2)
        assert exchanges >= 2 * 2 * 3  # q, k, v of the policy and the reference at both steps
        cuts = []
        for _ in range(2):  # the steps' rows: clip boundaries (a pair's two clips share a shape)
            toks = [single.sampler.tokens[r] // 2 for r in single.sampler.next_step().indices for _ in range(2)]
            bounds = torch.tensor([0, *toks]).cumsum(0).tolist()
            cuts.append(shard_range(bounds[-1], cp, 1)[0] not in bounds)
        assert any(cuts), cuts
        single.sampler.load_state_dict({"pos": 0})
    else:
        assert (dp, cp) == (2, 1) and exchanges == 0
    s0, s1, sgrads = _two_steps(single)
    assert f0 == pytest.approx(math.log(2), rel=1e-6) and s0 == pytest.approx(math.log(2), rel=1e-6)
    assert f1 == pytest.approx(s1, rel=1e-5, abs=1e-6) and s1 < math.log(2)  # the margin moved after one step
    assert fgrads.keys() == sgrads.keys()
    for n, g in sgrads.items():
        torch.testing.assert_close(fgrads[n], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-9, msg=n)
    assert ref and all(is_dt and not rg and no_grad and same for _, is_dt, rg, no_grad, same, _, _ in ref)
    assert sum(local for *_, local, _ in ref) < sum(full for *_, full in ref)  # rank 0 holds only its shards


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    """Three PyAV-written clips (two 4:3, one wide) preprocessed by ``mugv preprocess`` with a
    tiny VAE saved in its real format, and a one-step SFT run on the shards."""
    from mugv.config import PreprocessConfig
    from mugv.data.preprocess import preprocess
    from mugv.data.video import write_mp4
    from mugv.models.vae import VAEConfig, VideoVAE
    from mugv.train.trainer import Trainer
    from tests.stack.test_data import _frames, _StubText

    tmp = tmp_path_factory.mktemp("dpo_video")
    vids = tmp / "videos"
    vids.mkdir()
    for name, (h, w, seed) in {"a": (48, 64, 1), "b": (48, 64, 5), "wide": (32, 96, 2)}.items():
        write_mp4(_frames(12, h, w, seed), vids / f"{name}.mp4", fps=8)
    (vids / "captions.csv").write_text("video,caption\na.mp4,clip a\nb.mp4,clip b\nwide.mp4,clip wide\n")
    torch.manual_seed(0)
    VideoVAE(VAEConfig.from_preset("compact", filters=8, num_groups=4), kernels=False).save_pretrained(tmp / "vae")
    preprocess(load_config(PreprocessConfig, overrides=dict(
        videos=str(vids), captions=str(vids / "captions.csv"), out=str(tmp / "shards"), base_resolution=48,
        num_frames=[9], fps=8.0, device="cpu", vae=str(tmp / "vae"))), text_encoder=_StubText(), progress=False)
    Trainer(_cfg(tmp / "shards", tmp / "sft", steps=1)).fit()
    return tmp, tmp / "shards"


def test_pairs_of_video_paths(video_setup, tmp_path, monkeypatch):
    """Video paths in pairs.csv are encoded like ``mugv preprocess`` (the same latent as its
    shard), each video once, cached on disk across runs; the prompt is the caption; errors."""
    from mugv.data.shards import LatentDataset
    from mugv.text import encode_caption
    from mugv.train.dpo import PairVideoCache
    from tests.stack.test_data import _StubText

    tmp, data = video_setup
    ds = LatentDataset(data)
    key = {Path(m["source"]).stem: f"{f}:{m['key']}" for f, m in ds.entries}
    pairs = tmp / "pairs_video.csv"
    pairs.write_text("prompt,preferred,preferred_path,rejected_path\n"
                     "a cat,,videos/a.mp4,videos/b.mp4\n"
                     "a dog,,videos/b.mp4,videos/a.mp4\n"
                     f"a cow,{key['b']},,{tmp / 'videos' / 'a.mp4'}\n")  # a shard key, an absolute path
    encodes = []
    real = PairVideoCache._encode_video
    monkeypatch.setattr(PairVideoCache, "_encode_video", lambda self, p: encodes.append(p.name) or real(self, p))
    kw = dict(pairs=str(pairs), pairs_per_step=3, steps=1)
    tr = DPOTrainer(_dpo(tmp, data, "vid", **kw), text_encoder=_StubText())
    assert sorted(encodes) == ["a.mp4", "b.mp4"] and tr.videos.encoded == 2  # each video once
    shard_a = ds[[i for i, (_, m) in enumerate(ds.entries) if Path(m["source"]).stem == "a"][0]]
    lat_a, meta_a = tr._clip(tr.rows[0].preferred)
    torch.testing.assert_close(lat_a, shard_a.latent, rtol=0, atol=0)  # what preprocess stored
    assert (meta_a["height"], meta_a["width"], meta_a["fps"]) == (shard_a.meta["height"], shard_a.meta["width"],
                                                                 shard_a.meta["fps"])
    for row, prompt in zip(tr.rows, ("a cat", "a dog", "a cow")):
        torch.testing.assert_close(tr.row_text(row), encode_caption(_StubText(), prompt))
    assert tr.train_step(tr.sampler.next_step().indices).loss == pytest.approx(math.log(2), rel=1e-6)
    # a second run on the same --out reads the cache: no VAE or text-encoder load, no encode
    import mugv.models.vae as vae_mod

    monkeypatch.setattr(vae_mod.VideoVAE, "from_pretrained", lambda *a, **k: pytest.fail("VAE loaded"))
    again = DPOTrainer(_dpo(tmp, data, "vid", **kw))
    assert again.videos.encoded == 0 and len(encodes) == 2
    torch.testing.assert_close(again._clip(again.rows[0].preferred)[0], lat_a, rtol=0, atol=0)
    monkeypatch.undo()
    labels = tmp / "labels_video.csv"
    labels.write_text(f"prompt,key,path,label\na cat,,videos/a.mp4,1\na cow,{key['b']},,0\n")
    kto = DPOTrainer(_dpo(tmp, data, "vid", loss="kto", pairs=str(labels), pairs_per_step=2))
    assert [(r.has_video, r.liked, r.rejected) for r in kto.rows] == [(True, True, None), (False, False, None)]
    assert kto.train_step(kto.sampler.next_step().indices).loss == pytest.approx(0.5, abs=1e-6)

    def bad(text, err, match, shards=data):
        f = tmp_path / "bad.csv"
        f.write_text(text)
        with pytest.raises(err, match=match):
            DPOTrainer(_dpo(tmp, shards, "bad", pairs=str(f)), text_encoder=_StubText())

    v = tmp / "videos"
    bad(f"prompt,preferred_path,rejected_path\np,{v}/none.mp4,{v}/a.mp4\n", FileNotFoundError,
        "none.mp4': no such file")
    bad(f"prompt,preferred,preferred_path,rejected_path\np,,,{v}/a.mp4\n", ConfigError, "neither a shard key")
    bad(f"prompt,preferred,preferred_path,rejected_path\np,{key['a']},{v}/a.mp4,{v}/b.mp4\n", ConfigError, "both")
    bad(f"prompt,preferred_path,rejected_path\np,{v}/a.mp4,{v}/wide.mp4\n", ConfigError, "differ in shape")
    bad(f"prompt,preferred_path,rejected_path\n,{v}/a.mp4,{v}/b.mp4\n", ConfigError, "needs a prompt")
    bad("prompt,preferred,rejected\np,0,0\n", ConfigError, "several shards")
    bad(f"prompt,preferred,rejected\np,{v}/a.mp4,{v}/b.mp4\n", ConfigError, "preferred_path column")


def test_sft_weight_and_the_cli(setup, capsys):
    """``--sft-weight w`` adds ``w`` times the policy's mean flow MSE on the preferred clips
    (at step 0: ``log 2 + w * flow_w``); ``mugv train-dpo`` runs from the command line with
    ``--beta``, ``--sft-weight``, ``--loss`` and ``--init-from``."""
    from mugv.cli import main

    tmp, data = setup
    tr = DPOTrainer(_dpo(tmp, data, "sft_w", sft_weight=0.5))
    rows = tuple(range(P))
    loss, stats = tr.preference_loss(rows, step=3, grad=False)
    assert stats["flow_w"] > 0
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * stats["flow_w"], rel=1e-6)
    out = tmp / "cli"
    code = main(["train-dpo", "--init-from", str(tmp / "sft"), "--data", str(data), "--pairs", str(data / "pairs.csv"),
                 "--out", str(out), "--steps", "2", "--beta", "100", "--sft-weight", "0.1", "--loss", "dpo",
                 "--pairs-per-step", "2", "--depth", "1", "--hidden-size", "48", "--num-heads", "1",
                 "--token-budget", "160", "--device", "cpu", "--no-progress", "--no-tensorboard"])
    assert code == 0 and "preference-trained to step 2" in capsys.readouterr().out
    assert (out / "checkpoints" / "step_00000002").is_dir()


def test_resume_rebuilds_the_reference_from_init_from(setup):
    """A DPO run stopped after 2 of 4 steps and resumed gives the losses of an uninterrupted
    run exactly: the reference is the ``--init-from`` weights again, not the resumed policy."""
    tmp, data = setup
    full = DPOTrainer(_dpo(tmp, data, "full", steps=4, pairs_per_step=2)).fit()
    part = DPOTrainer(_dpo(tmp, data, "part", steps=4, pairs_per_step=2, checkpoint_every=2)).fit(stop_after=2)
    assert part.step == 2
    again = DPOTrainer(_dpo(tmp, data, "part", steps=4, pairs_per_step=2, checkpoint_every=2))
    assert again.cfg.resume and again.resume().name == "step_00000002" and again.step == 2
    resumed = again.fit()
    assert resumed.step == 4 and resumed.losses == full.losses and full.losses[0] == pytest.approx(math.log(2))
    assert full.losses[-1] < full.losses[0]
