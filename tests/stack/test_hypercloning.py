"""HyperCloning: the wide DiT computes the small one's function at zero noise (T2V, I2V,
packed), bad widths are refused, and the expanded run trains from a fresh optimizer."""

import math

import pytest
import torch

from mugv.models import DiTConfig, MUGDiT
from mugv.train.hypercloning import expand_config, expand_model, expand_run
from tests.stack.test_train import _cfg, make_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(dtype=torch.float64) -> MUGDiT:
    cfg = DiTConfig(depth=2, hidden_size=48, num_heads=2, in_channels=4, text_dim=16)  # head_dim 24
    torch.manual_seed(0)
    m = MUGDiT(cfg, kernels=False).to(dtype)
    with torch.no_grad():  # random everything: the zero-initialized projections would hide errors
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 4, 6, generator=g, dtype=dtype)
    y = torch.randn(2, 1, 5, 16, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, torch.tensor([300.0, 870.0], dtype=dtype), y, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_zero_noise_is_function_preserving(dtype, tol):
    small = _small(dtype)
    wide = expand_model(small, 144)  # k = 3: 2 heads of 24 -> 6 heads of 24
    assert wide.cfg.hidden_size == 144 and wide.cfg.num_heads == 6 and wide.cfg.head_dim == small.cfg.head_dim
    assert wide.num_params() > 2 * small.num_params()
    x, t, y, mask = _inputs(dtype)
    fps = torch.tensor([8.0])
    with torch.no_grad():
        ref = small(x, t, y, mask=mask, fps=fps)  # T2V
        torch.testing.assert_close(wide(x, t, y, mask=mask, fps=fps), ref, atol=tol, rtol=tol)
        xm = torch.tensor([[False, True, True], [True, True, True]])  # I2V: first frame clean in clip 0
        ref = small(x, t, y, mask=mask, fps=fps, x_mask=xm)
        torch.testing.assert_close(wide(x, t, y, mask=mask, fps=fps, x_mask=xm), ref, atol=tol, rtol=tol)
        lat = [x[0], x[1, :, :2, :3, :5]]  # packed: two sizes (one not a multiple of the patch)
        txt = [y[0, 0, :3], y[1, 0]]
        kw = dict(fps=torch.tensor([8.0, 24.0]), x_mask=[None, torch.tensor([False, True])])
        for a, b in zip(wide.forward_packed(lat, t, txt, **kw), small.forward_packed(lat, t, txt, **kw)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            assert b.abs().max() > 0.1  # the check is not vacuous
    # noise breaks the symmetry: a small, nonzero change
    noisy = expand_model(small, 96, noise=1e-3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = (noisy(x, t, y, mask=mask, fps=fps) - small(x, t, y, mask=mask, fps=fps)).abs().max() / ref.abs().max()
    assert 0 < d < 0.05


def test_bad_widths_are_refused():
    cfg = DiTConfig(depth=1, hidden_size=48, num_heads=2, in_channels=4, text_dim=16)
    with pytest.raises(ValueError, match="multiple k >= 2 of the current hidden_size 48"):
        expand_config(cfg, 72)
    with pytest.raises(ValueError, match="multiple"):
        expand_config(cfg, 48)
    with pytest.raises(ValueError, match="head_dim"):
        expand_config(cfg, 96, num_heads=2)
    with pytest.raises(TypeError, match="hidden_size"):
        expand_config(cfg, 96.0)
    assert expand_config(cfg, 96, num_heads=4).head_dim == 24


def test_expanded_run_trains(tmp_path):
    from mugv.train.runs import load_weights
    from mugv.train.trainer import Trainer

    data = make_shards(tmp_path / "shards", n=4)
    small = Trainer(_cfg(data, tmp_path / "small", steps=2, hidden_size=48, num_heads=1))
    small.fit()
    with pytest.raises(ValueError, match="multiple"):
        expand_run(tmp_path / "small", 60, tmp_path / "bad")
    from mugv.cli import main

    assert main(["expand", "--from", str(tmp_path / "small"), "--to-hidden-size", "100", "--out", str(tmp_path / "b")]) == 2
    step = expand_run(tmp_path / "small", 96, tmp_path / "wide", noise=0.0, source="model")
    assert step.name == "step_00000000"
    ref = MUGDiT(small.dit_cfg, kernels=False)
    load_weights(small.run_dir / "checkpoints" / "step_00000002", ref)
    wide = MUGDiT(DiTConfig(**{**small.dit_cfg.__dict__, "hidden_size": 96, "num_heads": 2, "flavor": None}),
                  kernels=False)
    load_weights(step, wide)
    z, txt = small.data[0].latent, small.data[0].text
    with torch.no_grad():
        a = wide.forward_packed([z], torch.tensor([500.0]), [txt], fps=torch.tensor([8.0]))[0]
        b = ref.forward_packed([z], torch.tensor([500.0]), [txt], fps=torch.tensor([8.0]))[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # init_from: the wide shape comes from the expanded run; a fresh optimizer; training lowers the loss
    tr = Trainer(_cfg(data, tmp_path / "grow", init_from=str(tmp_path / "wide"), hidden_size=0, num_heads=0, steps=10, lr=3e-3, warmup_steps=0,
                      lr_schedule="constant", i2v_ratio=0.0, caption_dropout=0.0))
    assert tr.dit_cfg.hidden_size == 96 and tr.dit_cfg.num_heads == 2 and not tr.optimizer.state
    for n, p in tr.model.named_parameters():
        torch.testing.assert_close(p, dict(wide.named_parameters())[n], rtol=0, atol=0)
    idx = tr.sampler.next_step().indices
    losses = [tr.train_step(idx).loss for _ in range(10)]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
