"""Rectified flow: noising/target math, the logistic-normal time shift against the public
formula, the loss over noised frames only, Euler + CFG sampling (exactness on a known
velocity field, determinism, batched CFG == separate calls), image-to-video
conditioning, the DiT integration, and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import assert_close

from mugv.diffusion import (
    RectifiedFlow,
    add_noise,
    flow_loss,
    logistic_normal,
    shift_ratio,
    timestep_shift,
    velocity_target,
)
from mugv.text import TextEmbeddings


def _public_timestep_transform(timestep, height, width, num_frames, num_timesteps=1000):
    """The public MUG-V ``timestep_transform`` (mug_v/scheduler/rectified_flow.py), written
    out from reading it: timestep in [0, num_timesteps]."""
    t = timestep / num_timesteps
    ratio = math.sqrt(height * width / (512 * 512)) * math.sqrt(num_frames / 1)
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


# ---------------------------------------------------------------------------- math


def test_add_noise_and_velocity_target():
    x0, eps = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)
    t = torch.tensor([0.25, 0.8])
    assert_close(add_noise(x0, eps, t), (1 - t.view(2, 1, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1, 1) * eps)
    tf = torch.rand(2, 4)  # per-frame times
    assert_close(add_noise(x0, eps, tf)[:, :, 2], add_noise(x0[:, :, 2], eps[:, :, 2], tf[:, 2]))
    # the default target is d x_t / dt (finite difference of the noising path)
    h = 1e-3
    fd = (add_noise(x0.double(), eps.double(), 0.3 + h) - add_noise(x0.double(), eps.double(), 0.3)) / h
    assert_close(velocity_target(x0, eps).double(), fd, dtype=torch.float32)
    assert torch.equal(velocity_target(x0, eps, "data_minus_noise"), x0 - eps)
    with pytest.raises(ValueError, match="velocity"):
        velocity_target(x0, eps, "eps")
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x0, eps[:1], 0.5)


def test_shift_matches_public_timestep_transform():
    # 720p, 5 s clip: 14 latent frames
    r = shift_ratio(720, 1280, 14)
    assert r == pytest.approx(math.sqrt(720 * 1280 / 512**2) * math.sqrt(14))
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    ours = timestep_shift(ts, r)
    for t, o in zip(ts.tolist(), ours.tolist()):
        assert o == pytest.approx(_public_timestep_transform(t * 1000, 720, 1280, 14) / 1000, rel=1e-12)
    assert ours[0] == 0 and ours[-1] == 1 and torch.all(ours[1:] > ts[1:] - 1e-12)
    assert torch.equal(timestep_shift(ts, 1.0), ts)
    flow = RectifiedFlow(num_sampling_steps=5)
    x = torch.zeros(1, 24, 14, 90, 160)  # latents of 720x1280 with 8x spatial compression
    times = flow.sampling_times(x)
    want = [_public_timestep_transform((1 - i / 5) * 1000, 720, 1280, 14) / 1000 for i in range(5)]
    assert times == pytest.approx(want, rel=1e-12)


def test_logistic_normal_times_and_shift():
    g = torch.Generator().manual_seed(0)
    t = logistic_normal(20000, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03
    flow = RectifiedFlow()
    x0 = torch.zeros(4, 2, 3, 8, 8)  # 64x64 pixels, 3 latent frames
    a = flow.sample_t(x0, generator=torch.Generator().manual_seed(1))
    raw = logistic_normal(4, generator=torch.Generator().manual_seed(1))
    assert_close(a, timestep_shift(raw, shift_ratio(64, 64, 3)))
    no_shift = RectifiedFlow(use_timestep_shift=False).sample_t(x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(no_shift, raw)
    b = flow.sample_t(x0, generator=torch.Generator().manual_seed(1), height=512, width=512, num_frames=1)
    assert_close(b, raw)


# ---------------------------------------------------------------------------- loss


class _Recorder:
    """A model that returns a fixed prediction and records what it was called with."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x, timestep, y, mask=None, x_mask=None, fps=None, **kw):
        self.calls.append(dict(x=x.clone(), timestep=timestep.clone(), y=y, mask=mask, x_mask=x_mask, fps=fps, kw=kw))
        return self.out


def test_loss_over_noised_frames_only():
    flow = RectifiedFlow()
    x0 = torch.randn(2, 3, 4, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.3, 0.7])
    target = noise - x0
    pred = target.clone()
    pred[:, :, 0] += 100.0  # garbage on the conditioning frame: must not count
    model = _Recorder(torch.cat([pred, torch.randn_like(pred)], dim=1))  # public DiT: 2C channels
    loss, extra = flow.training_loss(model, x0, "y", fps=torch.tensor([24.0, 24.0]), cond_frames=1, noise=noise, t=t)
    assert float(loss) == 0.0
    call = model.calls[0]
    assert call["x_mask"].tolist() == [[False, True, True, True]] * 2
    assert torch.equal(call["x"][:, :, 0], x0[:, :, 0])  # conditioning frame kept clean
    assert_close(call["x"][:, :, 1:], add_noise(x0, noise, t)[:, :, 1:])
    assert_close(call["timestep"], t * 1000)
    # the loss is the mean over noised elements (independent computation)
    pred2 = torch.randn_like(x0)
    noised = torch.tensor([[False, True, True, True], [False, False, True, True]])
    want = torch.stack([((pred2 - target)[b][:, noised[b]] ** 2).mean() for b in range(2)]).mean()
    assert_close(flow_loss(pred2, target, noised), want)
    assert_close(flow_loss(pred2, target), ((pred2 - target) ** 2).mean())
    # text-to-video: no x_mask passed, every frame in the loss
    model_t2v = _Recorder(pred2)
    loss_t2v, _ = flow.training_loss(model_t2v, x0, "y", noise=noise, t=t)
    assert model_t2v.calls[0]["x_mask"] is None
    assert_close(loss_t2v, ((pred2 - target) ** 2).mean())


def test_training_loss_is_seeded():
    flow = RectifiedFlow()
    x0 = torch.randn(2, 3, 2, 4, 4)

    def model(x, timestep, y, **kw):
        return x * 0.5

    a, ea = flow.training_loss(model, x0, None, generator=torch.Generator().manual_seed(3))
    b, eb = flow.training_loss(model, x0, None, generator=torch.Generator().manual_seed(3))
    c, _ = flow.training_loss(model, x0, None, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(ea["t"], eb["t"]) and not torch.equal(a, c)


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("velocity", ["noise_minus_data", "data_minus_noise"])
def test_euler_is_exact_on_a_straight_flow(velocity):
    """For one data point x*, the exact velocity field is (x_t - x*)/t (sign per convention);
    Euler on straight paths lands on x* whatever the (shifted) time grid."""
    target = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    sign = 1.0 if velocity == "noise_minus_data" else -1.0

    def model(x, timestep, y, **kw):
        t = timestep.view(-1, 1, 1, 1, 1).double() / 1000
        return sign * (x - target) / t

    flow = RectifiedFlow(num_sampling_steps=7, velocity=velocity)
    out = flow.sample(model, torch.randn(1, 2, 3, 4, 4, dtype=torch.float64), None, guidance_scale=1.0)
    assert_close(out, target, dtype=torch.float64, scale=1e4)


def _text_model(x, timestep, y, mask=None, x_mask=None, fps=None, **kw):
    """A batch-independent toy velocity that depends on x, t, the text (masked mean) and fps."""
    m = mask.to(x.dtype)[..., None]
    yy = y.reshape(y.shape[0], -1, y.shape[-1])
    pooled = (yy * m).sum(1) / m.sum(1)
    bias = pooled[:, : x.shape[1]].view(x.shape[0], x.shape[1], 1, 1, 1)
    out = torch.tanh(x) * (timestep.view(-1, 1, 1, 1, 1) / 1000) + bias + 0.01 * fps.view(-1, 1, 1, 1, 1)
    if x_mask is not None:
        out = out * (1 + x_mask[:, None, :, None, None].to(x.dtype))
    return out


def test_cfg_batched_equals_separate_calls_and_is_deterministic():
    flow = RectifiedFlow(num_sampling_steps=4, guidance_scale=3.0)
    B, C = 2, 3
    y = torch.randn(B, 1, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y_null = torch.randn(1, 1, 3, 8)  # shorter, broadcast over the batch
    mask_null = torch.ones(1, 3, dtype=torch.long)
    fps = torch.tensor([24.0, 30.0])
    noise = torch.randn((B, C, 3, 4, 4), generator=torch.Generator().manual_seed(7))
    calls = []

    def counted(x, *a, **k):
        calls.append(x.shape[0])
        return _text_model(x, *a, **k)

    out = flow.sample(counted, noise, y, y_null, mask=mask, mask_null=mask_null, fps=fps)
    assert calls == [2 * B] * 4  # cond and uncond in one forward per step
    again = flow.sample(_text_model, noise.clone(), y, y_null, mask=mask, mask_null=mask_null, fps=fps)
    assert torch.equal(out, again)
    other = torch.randn((B, C, 3, 4, 4), generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(flow.sample(_text_model, other, y, y_null, mask=mask, mask_null=mask_null, fps=fps), out)
    # independent Euler loop with separate cond/uncond calls
    z = noise.clone()
    times = flow.sampling_times(noise)
    yn = y_null.expand(B, -1, -1, -1)
    mn = mask_null.expand(B, -1)
    for i, t in enumerate(times):
        tn = times[i + 1] if i + 1 < len(times) else 0.0
        ts = torch.full((B,), t * 1000)
        vc = _text_model(z, ts, y, mask=mask, fps=fps)
        vu = _text_model(z, ts, yn, mask=mn, fps=fps)
        z = z + (vu + 3.0 * (vc - vu)) * (tn - t)
    assert_close(out, z, scale=10)
    # the noise can also be drawn inside from a seeded generator
    seeded = flow.sample(_text_model, (B, C, 3, 4, 4), y, y_null, generator=torch.Generator().manual_seed(7),
                         mask=mask, mask_null=mask_null, fps=fps)
    assert torch.equal(seeded, out)


def test_image_to_video_conditioning_and_text_embeddings():
    flow = RectifiedFlow(num_sampling_steps=3, guidance_scale=2.0)
    B, C, T = 2, 3, 4
    noise = torch.randn(B, C, T, 2, 2)
    ref = torch.randn(B, C, 1, 2, 2)
    states = torch.randn(7, 8)
    y = TextEmbeddings(states, torch.tensor([0, 3, 7], dtype=torch.int32), 4)
    y_null = TextEmbeddings(torch.zeros(1, 8), torch.tensor([0, 1], dtype=torch.int32), 1)
    seen = []

    def model(x, timestep, y, mask=None, x_mask=None, fps=None, frame_indice=None):
        seen.append((x[:, :, 0].clone(), x_mask.clone(), y, frame_indice))
        return torch.ones_like(x)

    fi = torch.arange(T + 2)[None]
    out = flow.sample(model, noise, y, y_null, cond_latents=ref, fps=torch.tensor([24.0]),
                      model_kwargs=dict(frame_indice=fi))
    assert torch.equal(out[:, :, :1], ref)
    assert not torch.equal(out[:, :, 1:], noise[:, :, 1:])
    for x_first, x_mask, yy, fidx in seen:
        assert torch.equal(x_first, torch.cat([ref, ref])[:, :, 0])
        assert x_mask.tolist() == [[False, True, True, True]] * (2 * B)
        assert isinstance(yy, TextEmbeddings) and yy.batch_size == 2 * B and yy.lengths.tolist() == [3, 4, 1, 1]
        assert fidx.shape == (1, T + 2)  # not per-sample: passed through untouched
    # ones as the velocity with noise_minus_data: z moves by -(total time) = -1 on noised frames
    assert_close(out[:, :, 1:], noise[:, :, 1:] - 1.0, scale=10)


def test_sampler_with_the_tiny_dit():
    """End to end with the real DiT (reference path): I2V + CFG with MiniLM-sized text."""
    models = pytest.importorskip("mugv.models")
    cfg = models.DiTConfig.from_flavor("tiny", depth=1, in_channels=4)
    dit = models.MUGDiT(cfg, kernels=False).eval()
    if hasattr(dit, "init_weights"):
        dit.init_weights()
    flow = RectifiedFlow(num_sampling_steps=2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 4, 3, 4, 4), generator=g)
    y = torch.randn(1, 1, 5, cfg.text_dim)
    y_null = torch.zeros(1, 1, 5, cfg.text_dim)
    mask = torch.ones(1, 5, dtype=torch.long)
    ref = torch.randn(1, 4, 1, 4, 4)
    kw = dict(mask=mask, mask_null=mask, fps=torch.tensor([24.0]), cond_latents=ref)
    a = flow.sample(dit, noise, y, y_null, **kw)
    b = flow.sample(dit, noise, y, y_null, **kw)
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.equal(a[:, :, :1], ref)
    x0 = torch.randn(2, 4, 3, 4, 4)
    loss, _ = flow.training_loss(dit, x0, torch.randn(2, 1, 5, cfg.text_dim), mask=torch.ones(2, 5),
                                 fps=torch.tensor([24.0, 24.0]), cond_frames=1, generator=g)
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs():
    flow = RectifiedFlow(num_sampling_steps=1)
    noise = torch.randn(1, 3, 2, 2, 2)
    y = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="5-D"):
        flow.sample(_text_model, noise[0], y, y)
    with pytest.raises(ValueError, match="y_null"):
        flow.sample(_text_model, noise, y)
    with pytest.raises(ValueError, match="cond_latents"):
        flow.sample(_text_model, noise, y, y, cond_latents=torch.randn(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, 3 or 6"):
        flow.sample(lambda x, *a, **k: x[:, :2], noise, y, y, fps=torch.ones(1))
    with pytest.raises(ValueError, match="cond_frames"):
        flow.training_loss(lambda x, *a, **k: x, noise, y, cond_frames=2)
    with pytest.raises(ValueError, match="noised"):
        flow_loss(noise, noise, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="velocity"):
        RectifiedFlow(velocity="x0")
    with pytest.raises(ValueError, match="unknown RectifiedFlow preset"):
        RectifiedFlow.from_preset("sd3")
    assert RectifiedFlow.from_preset("mugv").velocity == "data_minus_noise"
