"""Ulysses context parallelism over the ("dp_replicate", "dp_shard", "cp") mesh with FSDP2,
on CPU/gloo: losses and every parameter gradient equal one process on the same global batch
(fp32), with clip boundaries inside the shares, image-to-video frames and a one-token (empty
prompt) caption; activation checkpointing modes give the gradients of none; the errors."""

import dataclasses
import os
import warnings

import pytest
import torch

from mugv.models import DiTConfig, MUGDiT
from tests.stack._dist import free_port, start_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 heads of 12 (RoPE sections of 4): cp in {1, 2, 4}
CFG = dict(depth=2, hidden_size=48, num_heads=4, in_channels=4, text_dim=16)
# (T, H, W) latents -> 18, 5, 8, 6, 10 tokens (start/end included): 47 tokens, shares of
# 12 (cp=4, the last padded by 1) or 24 (cp=2) cut through clips; the 4th clip is image-to-video
SHAPES = [(2, 4, 8), (3, 2, 2), (1, 6, 4), (2, 2, 4), (2, 4, 4)]
TEXT_LENS = [3, 1, 5, 2, 4]  # 1: the empty prompt encodes to one token
TOL = dict(rtol=1e-5, atol=1e-6)


def _model() -> MUGDiT:
    torch.manual_seed(0)
    m = MUGDiT(DiTConfig.from_flavor("tiny", **CFG), kernels=False)
    with torch.no_grad():  # non-zero output layers, so every gradient is non-trivial
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def _clips():
    g = torch.Generator().manual_seed(1)
    c = CFG["in_channels"]
    lat = [torch.randn(c, *s, generator=g) for s in SHAPES]
    tgt = [torch.randn(c, *s, generator=g) for s in SHAPES]
    text = [torch.randn(n, CFG["text_dim"], generator=g) for n in TEXT_LENS]
    masks = [torch.ones(s[0], dtype=torch.bool) for s in SHAPES]
    masks[3][0] = False  # image-to-video: the first latent frame is conditioning (t0)
    ts = torch.tensor([100.0, 500.0, 900.0, 250.0, 700.0])
    fps = torch.tensor([8.0, 8.0, 24.0, 8.0, 16.0])
    return lat, tgt, text, masks, ts, fps


def _sq_err(model, idx, clips):
    lat, tgt, text, masks, ts, fps = clips
    out = model.forward_packed([lat[i] for i in idx], ts[idx], [text[i] for i in idx], fps=fps[idx],
                               x_mask=[masks[i] for i in idx])
    sq = sum(((o[: CFG["in_channels"]] - tgt[i]).pow(2)[:, masks[i]]).sum() for o, i in zip(out, idx))
    count = sum(tgt[i][:, masks[i]].numel() for i in idx)
    return sq, count


def _reference():
    """One process, all clips in one packed forward: loss and full gradients."""
    model, clips = _model(), _clips()
    sq, count = _sq_err(model, list(range(len(SHAPES))), clips)
    loss = sq / count
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _trainer_cfg(data, out, **kw):
    from tests.stack.test_train import _cfg

    return _cfg(data, out, num_heads=2, steps=2, **kw)


def _worker(rank, world, port, runs, out, data=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("error", message=".*deprecated")  # no deprecated mesh slicing or collective
    import torch.distributed as dist

    from mugv.train.parallelize import ParallelDims, build_mesh, fsdp_mesh, parallelize_dit

    dist.init_process_group("gloo")
    try:
        results = []
        for dp_replicate, cp, ac in runs:
            dims = ParallelDims.from_world(world, dp_replicate=dp_replicate, cp=cp)
            mesh = build_mesh(dims, "cpu")
            model = parallelize_dit(_model(), fsdp=True, param_dtype=torch.float32, mesh=fsdp_mesh(mesh),
                                    cp_mesh=mesh["cp"], activation_checkpointing=ac)
            clips = _clips()
            d = dims.dp_rank(rank)
            idx = list(range(d, len(SHAPES), dims.dp))  # this cp group's micro-batch
            sq, count = _sq_err(model, idx, clips)
            stats = torch.stack([sq.detach(), torch.tensor(float(count))])
            dist.all_reduce(stats)  # as the trainer: each micro-batch counted cp times
            loss = sq / stats[1] * world
            loss.backward()
            grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() for n, p in model.named_parameters()}
            if rank == 0:
                results.append(((stats[0] / stats[1]).item(), grads))
        if data is not None:  # the trainer: cp=2 x dp_shard=2, budget 2 * 160 per cp group
            from mugv.train.trainer import Trainer

            tr = Trainer(_trainer_cfg(data, os.path.dirname(out) + "/run", context_parallel=2,
                                      activation_checkpointing="selective"))
            assert tr.sampler.token_budget == 320 and tr.sampler.num_replicas == 2
            results.append([tr.train_step(tr.sampler.next_step().indices).loss for _ in range(2)])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, runs, tmp_path, data=None):
    """``world`` gloo ranks (forked from the forkserver, see ``tests.stack._dist``) running
    ``runs`` (and the trainer on ``data``); rank 0's results."""
    out = tmp_path / "results.pt"
    start_ranks(_worker, (world, free_port(), runs, str(out), data), world,
                preload=("mugv.train.parallelize", "mugv.train.trainer", "tests.stack.test_train"))
    return torch.load(out)


def test_cp_fsdp_matches_one_process(tmp_path):
    """cp=4; dp_shard=2 x cp=2 with each AC mode; HSDP dp_replicate=2 x cp=2; the trainer with
    cp=2 x dp_shard=2 against one process on the union of the micro-batches (4 gloo ranks, started once)."""
    from mugv.data.sampler import PackingSampler
    from mugv.train.trainer import Trainer
    from tests.stack.test_train import make_shards

    data = make_shards(tmp_path / "shards")
    runs = [(1, 4, "none"), (1, 2, "none"), (1, 2, "selective"), (1, 2, "full"), (2, 2, "selective")]
    results = run_ranks(4, runs, tmp_path, str(data))
    cp_losses = results.pop()
    tr = Trainer(_trainer_cfg(data, tmp_path / "single"))
    plan = PackingSampler(tr.clip_tokens, 2 * 160, num_replicas=2, seed=0)
    single = [tr.train_step(tuple(c for b in plan.next_step().per_rank for c in b)).loss for _ in range(2)]
    torch.testing.assert_close(torch.tensor(cp_losses), torch.tensor(single), rtol=1e-5, atol=1e-6)
    ref_loss, ref_grads = _reference()
    assert len(results) == len(runs)
    for run, (loss, grads) in zip(runs, results):
        assert loss == pytest.approx(ref_loss, rel=1e-5), run
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            assert g.abs().sum() > 0, n
            torch.testing.assert_close(grads[n], g, **TOL, msg=lambda m, n=n, run=run: f"{run} {n}: {m}")


def test_shares_cut_clips():
    """The test batch really puts clip boundaries inside shares, and some clip has no token in a share."""
    from mugv.train.context_parallel import shard_range

    toks = [t * h // 2 * w // 2 + 2 for t, h, w in SHAPES]
    cu = torch.tensor([0, *torch.tensor(toks).cumsum(0).tolist()])
    for cp in (2, 4):
        cuts = {shard_range(int(cu[-1]), cp, r)[0] for r in range(1, cp)}
        assert not cuts & set(cu.tolist()), (cp, cuts)
        s, e, _ = shard_range(int(cu[-1]), cp, 0)
        assert ((cu.clamp(s, e) - s).diff() == 0).any()  # an empty cross-attention segment


def test_head_divisibility_error():
    from mugv.train.context_parallel import check_cp_heads

    check_cp_heads(48, 8)
    with pytest.raises(ValueError, match=r"num_heads=48 is not divisible by cp=5.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        check_cp_heads(48, 5)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_cp_heads(4, 0)


def test_parallel_dims_errors():
    from mugv.config import ConfigError
    from mugv.train.parallelize import ParallelDims

    d = ParallelDims.from_world(64, dp_replicate=8, cp=4)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.dp) == (8, 2, 4, 16)
    assert [d.dp_rank(r) for r in (0, 3, 4, 63)] == [0, 0, 1, 15]
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims.from_world(6, cp=4)
    with pytest.raises(ConfigError, match=">= 1"):
        ParallelDims.from_world(4, cp=0)


def test_selective_checkpoint_saves_matmuls_and_attention():
    """Under ``selective``, which ops' outputs the policy keeps (matmuls, attention) and which
    it leaves to recompute (norms, modulation, RoPE, GELU, residuals), seen on a real block."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from mugv.train.parallelize import selective_checkpoint_policy

    model, clips = _model(), _clips()
    seen: dict[str, CheckpointPolicy] = {}

    def spy(ctx, func, *args, **kwargs):
        decision = selective_checkpoint_policy(ctx, func, *args, **kwargs)
        if not ctx.is_recompute:
            seen[str(func.overloadpacket)] = decision
        return decision

    blk = model.blocks[0]
    captured = {}
    h = blk.register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    _sq_err(model, [0, 1], clips)
    h.remove()
    x, batch = captured["args"]
    batch = dataclasses.replace(batch, t_mlp=batch.t_mlp.detach(), text=batch.text.detach())
    x = x.detach().requires_grad_()
    out = checkpoint(blk, x, batch, use_reentrant=False,
                     context_fn=lambda: create_selective_checkpoint_contexts(spy))
    out.sum().backward()
    saved = {k for k, v in seen.items() if v == CheckpointPolicy.MUST_SAVE}
    recomputed = {k for k, v in seen.items() if v == CheckpointPolicy.PREFER_RECOMPUTE}
    # linears (addmm) and attention: on CPU with a gradient SDPA runs its math path, whose
    # QK^T and PV matmuls are bmm (the fused GPU kernels are on the saved list by name)
    assert {"aten.addmm", "aten.bmm"} <= saved, saved
    assert {"aten.gelu", "aten.mul", "aten.add"} <= recomputed, recomputed
    assert any(k in recomputed for k in ("aten.native_layer_norm", "aten.rsqrt", "aten.var_mean")), recomputed
    assert "aten._softmax" in recomputed or "aten._safe_softmax" in recomputed, recomputed
    assert not any("layer_norm" in k or "gelu" in k for k in saved)
    # and the gradient equals the plain block's
    ref = x.detach().requires_grad_()
    blk(ref, batch).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_memory_count_per_ac_mode():
    """The meta-device count: full < selective < none, cp divides the count, the parts add up."""
    from mugv.train.memory import count_block_activations, count_model_activations

    one = count_block_activations("debug", 4802, 1)
    two = count_block_activations("debug", 4802, 2)
    assert one["full"] == 4802 * 288 * 2  # the bf16 block input
    assert one["full"] < one["selective"] < one["none"]
    assert two["none"] == pytest.approx(one["none"] / 2, rel=0.05)
    model = count_model_activations("debug", 4802, 2)
    assert model["full"] == 56 * two["full"] + two["none"]
    with pytest.raises(ValueError, match="not divisible"):
        count_block_activations("debug", 100, 3)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_converts_the_big_linears(recipe):
    """The module tree after conversion (emulated on CPU: no fp8 hardware), the forward close to
    the fp32 one, and the clear error on a device without fp8 tensor cores."""
    from torchao.float8.float8_linear import Float8Linear

    from mugv.config import ConfigError
    from mugv.train.fp8 import apply_fp8, check_fp8_device

    model, clips = _model(), _clips()
    ref = model.forward_packed(clips[0][:2], clips[4][:2], clips[2][:2], fps=clips[5][:2])
    names = apply_fp8(model, recipe, emulate=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == set(names) and len(names) == CFG["depth"] * 7  # qkv, 2 proj, q_linear, kv_linear, fc1, fc2
    assert all(n.startswith("blocks.") for n in names)
    assert type(model.final_layer.linear) is torch.nn.Linear and type(model.t_block[1]) is torch.nn.Linear
    out = model.forward_packed(clips[0][:2], clips[4][:2], clips[2][:2], fps=clips[5][:2])
    for a, b in zip(out, ref):
        assert (a - b).norm() / b.norm() < 0.1  # fp8 e4m3 rounding of the matmul inputs
        assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="fp8 tensor cores"):
        check_fp8_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="fp8 must be"):
        apply_fp8(model, "blockwise")


def test_trainer_refuses_fp8_without_fp8_hardware(tmp_path):
    from mugv.config import ConfigError
    from mugv.train.trainer import Trainer
    from tests.stack.test_train import make_shards

    data = make_shards(tmp_path / "shards", n=2)
    with pytest.raises(ConfigError, match="--fp8 needs a CUDA GPU"):
        Trainer(_trainer_cfg(data, tmp_path / "run", fp8="rowwise"))
