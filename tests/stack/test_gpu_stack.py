"""The models on CUDA: the DiT and the video VAE with the fused kernels against the same
weights on the PyTorch reference backend, forward and gradients (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_dit_kernels_match_reference(dtype):
    """Two packed clips of different sizes (I2V on one), kernels="auto" vs "reference"."""
    from mugv.models import DiTConfig, MUGDiT

    torch.manual_seed(0)
    cfg = DiTConfig.from_flavor("debug", depth=2, text_dim=64)
    model = MUGDiT(cfg, kernels=True).cuda()
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere (the init zeroes some projections)
            p.add_(0.02 * torch.randn_like(p))
    lat = [torch.randn(cfg.in_channels, 3, 8, 12, device="cuda"), torch.randn(cfg.in_channels, 2, 6, 6, device="cuda")]
    text = [torch.randn(7, 64, device="cuda"), torch.randn(3, 64, device="cuda")]
    ts, fps = torch.tensor([300.0, 800.0], device="cuda"), torch.tensor([24.0, 24.0], device="cuda")
    masks = [torch.tensor([False, True, True], device="cuda"), None]

    def run(kernels):
        model.kernels = kernels
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            outs = model.forward_packed(lat, ts, text, fps=fps, x_mask=masks)
        loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        return [o.detach().float() for o in outs], _grads(model)

    outs_k, grads_k = run(True)
    outs_r, grads_r = run("reference")
    for a, b in zip(outs_k, outs_r):
        assert_close(a, b, dtype, scale=10)
    assert grads_k.keys() == grads_r.keys()
    for name in grads_k:
        g, r = grads_k[name].float(), grads_r[name].float()
        tol = 0.05 if dtype == torch.bfloat16 else 2e-3
        assert (g - r).norm() <= tol * r.norm() + 1e-6, name


def test_vae_kernels_match_reference():
    """The compact causal VAE: encode + decode and the gradient of a reconstruction loss."""
    from mugv.models.vae import VAEConfig, VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE(VAEConfig.from_preset("compact", filters=32, num_groups=8), kernels=True).cuda()
    x = torch.randn(1, 3, 9, 32, 48, device="cuda")

    def run(kernels):
        vae.set_kernels(kernels)
        vae.zero_grad(set_to_none=True)
        post = vae.encode(x)
        rec = vae.decode(post.mode(), num_frames=x.shape[2])
        (rec - x).square().mean().backward()
        return post.mode().detach(), rec.detach(), _grads(vae)

    zk, rk, gk = run(True)
    zr, rr, gr = run("reference")
    assert_close(zk, zr, torch.float32, scale=100)
    assert_close(rk, rr, torch.float32, scale=100)
    for name in gk:
        assert (gk[name] - gr[name]).norm() <= 2e-3 * gr[name].norm() + 1e-6, name
