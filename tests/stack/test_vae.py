"""Video VAE: the mugv-compat preset against an independent re-implementation of the public
MUG-V temporal VAE (tests/stack/_mugv_public_vae.py), the compact preset's exact streaming and
causality, the posterior API, shapes and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import assert_close

from tests.stack._mugv_public_vae import PubTemporalVAE, pipeline_decode, pipeline_encode_mean
from mugv.models import DiagonalGaussian, VAEConfig, VideoVAE

TINY_COMPAT = dict(in_out_channels=6, latent_embed_dim=4, embed_dim=4, filters=8, num_res_blocks=1,
                   channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, True), num_groups=4)
TINY_COMPACT = dict(filters=4, channel_multipliers=(1, 2, 2, 4), num_groups=2, latent_embed_dim=6)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (GroupNorm affines included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):  # GroupNorm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 4
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


@pytest.fixture(scope="module")
def compat_pair():
    torch.manual_seed(0)
    pub = PubTemporalVAE(**TINY_COMPAT).eval()
    _randomize(pub)
    ours = VideoVAE(VAEConfig.from_preset("mugv-compat", micro_frame_size=None, first_frame="zeros", **TINY_COMPAT),
                    kernels=False).eval()
    ours.load_state_dict(pub.state_dict(), strict=True)
    return pub, ours


# ---------------------------------------------------------------------------- mugv-compat


def test_compat_state_dict_matches_public_full_size():
    """The full released configuration: identical key names and shapes (built on meta)."""
    with torch.device("meta"):
        pub = PubTemporalVAE(in_out_channels=512, latent_embed_dim=24, embed_dim=24, filters=128, num_res_blocks=4,
                             channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, True), num_groups=32)
        ours = VideoVAE(VAEConfig.from_preset("mugv-compat"))
    a = {k: tuple(v.shape) for k, v in pub.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b
    ours.load_state_dict(pub.state_dict(), strict=True, assign=True)
    assert ours.config.latent_channels == 24 and ours.config.temporal_compression == 8


@pytest.mark.parametrize("T", [16, 13, 8])
def test_compat_encode_equals_public(compat_pair, T):
    pub, ours = compat_pair
    x = torch.randn(2, 6, T, 3, 4)
    with torch.no_grad():
        a = pub.encode(x)
        b = ours.encode(x, normalize=False)
        b_chunked = ours.encode(x, normalize=False, chunk_frames=8)
    assert b.mean.shape == (2, 4, math.ceil(T / 8), 3, 4)
    assert_close(b.mean, a.mean)
    assert_close(b.logvar, a.logvar)
    assert_close(b.kl(), a.kl(), scale=10)
    assert_close(b_chunked.mean, a.mean)


@pytest.mark.parametrize("num_frames", [16, 13, 9])
def test_compat_decode_equals_public(compat_pair, num_frames):
    pub, ours = compat_pair
    z = torch.randn(2, 4, 2, 3, 4)
    with torch.no_grad():
        a = pub.decode(z, num_frames)
        b = ours.decode(z, num_frames, normalized=False)
    assert b.shape == (2, 6, num_frames, 3, 4)
    assert_close(b, a)


@pytest.mark.parametrize("T", [33, 1])
def test_compat_pipeline_micro_frames_and_first_frame(compat_pair, T):
    """Released pipeline semantics: micro_frame_size chunks, first frame repeated for 8k+1."""
    pub, base = compat_pair
    ours = VideoVAE(VAEConfig.from_preset("mugv-compat", micro_frame_size=16, **TINY_COMPAT), kernels=False).eval()
    ours.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(1, 6, T, 2, 3)
    with torch.no_grad():
        want = pipeline_encode_mean(pub, x, 16)
        post = ours.encode(x, normalize=False)
        assert_close(post.mean, want)
        assert post.mean.shape[2] == ours.num_latent_frames(T) == ours.get_latent_size((T, 2, 3))[0]
        z = torch.randn_like(post.mean)
        assert_close(ours.decode(z, T, normalized=False), pipeline_decode(pub, z, T, 16))
        assert ours.decode(z, T, normalized=False).shape[2] == T
    if T == 1:  # the public I2V reference: the image repeated 8 times
        with torch.no_grad():
            assert_close(post.mean, pub.encode(x.repeat(1, 1, 8, 1, 1)).mean)


def test_compat_latent_normalization_uses_released_stats():
    cfg = VAEConfig.from_preset("mugv-compat", in_out_channels=3, filters=8, num_res_blocks=1, num_groups=4)
    assert cfg.latent_mean is not None and len(cfg.latent_mean) == 24
    vae = VideoVAE(cfg, kernels=False).eval()
    x = torch.randn(1, 3, 8, 2, 2)
    with torch.no_grad():
        raw = vae.encode(x, normalize=False)
        norm = vae.encode(x)
        mean = torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1)
        assert_close(norm.mean, (raw.mean - mean) / std)
        assert_close(norm.std, raw.std / std)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert_close(norm.sample(g1), (raw.sample(g2) - mean) / std)
        assert_close(vae.decode(norm.mean, 8), vae.decode(raw.mean, 8, normalized=False))
    # the statistics are config, not state: the public state dict still loads strictly
    assert "latent_mean" not in vae.state_dict()


# ---------------------------------------------------------------------------- compact


@pytest.fixture(scope="module")
def compact():
    torch.manual_seed(1)
    vae = VideoVAE(VAEConfig.from_preset("compact", **TINY_COMPACT), kernels=False).eval()
    _randomize(vae, seed=1)
    return vae


def test_compact_streaming_encode_equals_one_pass(compact):
    x = torch.randn(1, 3, 25, 16, 16)
    with torch.no_grad():
        one = compact.encode(x)
        chunked = compact.encode(x, chunk_frames=8)
        chunked16 = compact.encode(x, chunk_frames=16)
        streamed = list(compact.encode_stream(x.split([8, 8, 9], dim=2)))
    assert one.mean.shape == (1, 6, 4, 2, 2)
    assert_close(chunked.mean, one.mean)
    assert_close(chunked.logvar, one.logvar)
    assert_close(chunked16.mean, one.mean)
    assert [p.mean.shape[2] for p in streamed] == [1, 1, 2]
    assert_close(DiagonalGaussian.cat(streamed).mean, one.mean)


def test_compact_streaming_decode_equals_one_pass(compact):
    z = torch.randn(1, 6, 4, 2, 2)
    with torch.no_grad():
        one = compact.decode(z)
        by1 = compact.decode(z, chunk_latents=1)
        by3 = compact.decode(z, chunk_latents=3)
        parts = list(compact.decode_stream(z.split([2, 2], dim=2)))
    assert one.shape == (1, 3, 25, 16, 16)
    assert_close(by1, one)
    assert_close(by3, one)
    assert [p.shape[2] for p in parts] == [9, 16]
    assert_close(torch.cat(parts, dim=2), one)


def test_compact_is_causal(compact):
    """Latent j sees frames <= 8j only; output frame t sees latents <= ceil(t/8) only."""
    x = torch.randn(1, 3, 17, 8, 8)
    x2 = x.clone()
    x2[:, :, 9:] = torch.randn_like(x2[:, :, 9:])
    z = torch.randn(1, 6, 3, 1, 1)
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = compact.encode(x).mean, compact.encode(x2).mean
        assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.allclose(a[:, :, 2], b[:, :, 2])
        u, v = compact.decode(z), compact.decode(z2)
        assert torch.equal(u[:, :, :9], v[:, :, :9]) and not torch.allclose(u[:, :, 9:], v[:, :, 9:])


@pytest.mark.parametrize("T,L", [(1, 1), (9, 2), (17, 3), (16, 3), (10, 3)])
def test_compact_shapes_and_first_frame(compact, T, L):
    x = torch.randn(1, 3, T, 16, 8)
    with torch.no_grad():
        post = compact.encode(x)
        assert post.mean.shape == (1, 6, L, 2, 1)
        assert compact.num_latent_frames(T) == L
        assert compact.decode(post.mode(), num_frames=T).shape == (1, 3, T, 16, 8)
        assert compact.decode(post.mode()).shape[2] == 8 * (L - 1) + 1
    if T == 16:  # padded in front with copies of frame 0: same as encoding the padded clip
        with torch.no_grad():
            padded = torch.cat([x[:, :, :1], x], dim=2)
            assert_close(post.mean, compact.encode(padded).mean)


def test_compact_default_preset_is_8x8x8_24ch_and_trains():
    cfg = VAEConfig.from_preset("compact")
    assert (cfg.temporal_compression, cfg.spatial_compression, cfg.latent_channels) == (8, 8, 24)
    assert [T for T in range(0, 27) if cfg.is_whole_clip(T)] == [1, 9, 17, 25]
    two = VAEConfig.from_preset("compact", channel_multipliers=(1, 2), temporal_downsample=(True,),
                                spatial_downsample=(True,))
    assert two.temporal_compression == 2 and [T for T in range(6) if two.is_whole_clip(T)] == [1, 3, 5]
    vae = VideoVAE(cfg, kernels=False)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    recon, post, z = vae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and z.shape == (1, 24, 2, 2, 2)
    loss = (recon - x).abs().mean() + 1e-6 * post.kl().mean()
    loss.backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------- posterior


def test_posterior_api_against_torch_distributions():
    mean = torch.randn(2, 3, 2, 4, 4)
    logvar = torch.randn(2, 3, 2, 4, 4)
    post = DiagonalGaussian.from_moments(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mode(), mean) and torch.equal(post.mean, mean)
    assert_close(post.var, logvar.exp())
    s1 = post.sample(torch.Generator().manual_seed(5))
    s2 = post.sample(torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.sample(torch.Generator().manual_seed(6)))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl_ref = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3, 4))
    assert post.kl().shape == (2,)
    assert_close(post.kl(), kl_ref, scale=10)
    other = DiagonalGaussian(torch.randn_like(mean), torch.randn_like(mean))
    q_other = torch.distributions.Normal(other.mean, other.std)
    kl_ref2 = torch.distributions.kl_divergence(q, q_other).sum(dim=(1, 2, 3, 4))
    assert_close(post.kl(other), kl_ref2, scale=10)
    assert_close(post.nll(s1), -q.log_prob(s1).sum(dim=(1, 2, 3, 4)), scale=10)
    clamped = DiagonalGaussian(mean, torch.full_like(mean, 100.0))
    assert float(clamped.logvar.max()) == 20.0


# ---------------------------------------------------------------------------- kernels


def test_kernel_backend_matches_reference():
    """``kernels=True`` (the Triton kernels, run by the interpreter here) equals
    ``kernels=False`` (the ops' PyTorch reference) on a whole small compact VAE, batch of 2
    (each sample's per-frame GroupNorm on a transposed view), one pass and streamed (carried
    context, including the shorter history a strided conv leaves); every conv and GroupNorm
    gets the backend."""
    from mugv_kernels.nn import CausalConv3d, GroupNormSiLU

    small = dict(filters=4, channel_multipliers=(1, 2), temporal_downsample=(True,), spatial_downsample=(True,),
                 num_groups=2, latent_embed_dim=4)
    ref_vae = VideoVAE(VAEConfig.from_preset("compact", **small), kernels=False).eval()
    _randomize(ref_vae, seed=4)
    fast = VideoVAE(VAEConfig.from_preset("compact", **small), kernels=True).eval()
    fast.load_state_dict(ref_vae.state_dict())
    ops = [m for m in fast.modules() if isinstance(m, (CausalConv3d, GroupNormSiLU))]
    assert len(ops) > 20 and {m.backend for m in ops} == {"auto"}
    assert {m.backend for m in ref_vae.modules() if isinstance(m, (CausalConv3d, GroupNormSiLU))} == {"reference"}
    x = torch.randn(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_vae.encode(x).mean
        assert ref.shape == (2, 4, 3, 1, 1)
        assert_close(fast.encode(x).mean, ref, scale=10)
        streamed = DiagonalGaussian.cat(list(fast.encode_stream(x.split([3, 2], dim=2))))
        assert_close(streamed.mean, ref, scale=10)
        assert_close(fast.decode(ref), ref_vae.decode(ref), scale=10)
    fast.set_kernels(False)
    assert {m.backend for m in ops} == {"reference"}
    with pytest.raises(ValueError, match="kernels must be"):
        fast.set_kernels("cuda-please")


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(compact):
    with pytest.raises(ValueError, match="expects 3"):
        compact.encode(torch.randn(1, 4, 9, 8, 8))
    with pytest.raises(ValueError, match="expects 6"):
        compact.decode(torch.randn(1, 5, 2, 1, 1))
    with pytest.raises(ValueError, match="5-D"):
        compact.encode(torch.randn(3, 9, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        compact.encode(torch.zeros(1, 3, 9, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of the spatial compression 8"):
        compact.encode(torch.randn(1, 3, 9, 12, 8))
    with pytest.raises(ValueError, match="num_frames"):
        compact.decode(torch.randn(1, 6, 2, 1, 1), num_frames=20)
    with pytest.raises(ValueError, match="chunk_frames"):
        compact.encode(torch.randn(1, 3, 9, 8, 8), chunk_frames=5)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.from_preset("sdxl")
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        VAEConfig.from_preset("compact", channels=3)
    with pytest.raises(ValueError, match="latent_mean"):
        VAEConfig.from_preset("compact", latent_mean=(0.0,) * 3)
    with pytest.raises(ValueError, match="num_groups"):
        VAEConfig.from_preset("compact", num_groups=3)
    with pytest.raises(ValueError, match="compress time by 8"):
        VAEConfig.from_preset("mugv-compat", temporal_downsample=(True, True, False))
    with pytest.raises(ValueError, match="patch_size is a compact option"):
        VAEConfig.from_preset("mugv-compat", patch_size=2)
    with pytest.raises(ValueError, match="micro_frame_size is a mugv-compat option"):
        VAEConfig.from_preset("compact", micro_frame_size=48)
    with pytest.raises(ValueError, match="spatial_downsample"):
        VAEConfig.from_preset("compact", spatial_downsample=(True,))
    comp = VideoVAE(VAEConfig.from_preset("mugv-compat", **TINY_COMPAT), kernels=False)
    with pytest.raises(ValueError, match="encode_stream needs"):
        next(comp.encode_stream([torch.randn(1, 6, 8, 2, 2)]))
    with pytest.raises(TypeError, match="VAEConfig"):
        VideoVAE({"arch": "compact"})


def test_load_released_pipeline_checkpoint(compat_pair, tmp_path):
    """The released vae.pt holds the whole pipeline: temporal_vae.*, spatial_vae.*, shift/scale."""
    pub, _ = compat_pair
    sd = {f"temporal_vae.{k}": v for k, v in pub.state_dict().items()}
    sd["spatial_vae.module.encoder.conv_in.weight"] = torch.zeros(1)
    sd["logvar"] = torch.tensor(4.0)
    sd["shift"] = torch.arange(4.0)
    sd["scale"] = torch.full((4,), 2.0)
    torch.save(sd, tmp_path / "vae.pt")
    vae = VideoVAE(VAEConfig.from_preset("mugv-compat", micro_frame_size=None, first_frame="zeros", **TINY_COMPAT),
                   kernels=False)
    info = vae.load_public_state_dict(str(tmp_path / "vae.pt"))
    assert info["ignored"] == ["logvar", "spatial_vae.module.encoder.conv_in.weight"]
    assert info["latent_mean"].tolist() == [0.0, 1.0, 2.0, 3.0] and info["latent_std"].tolist() == [2.0] * 4
    x = torch.randn(1, 6, 8, 2, 2)
    with torch.no_grad():
        assert_close(vae.encode(x).mean, (pub.encode(x).mean - sd["shift"].view(1, -1, 1, 1, 1)) / 2.0)
    bad = dict(sd)
    del bad["temporal_vae.quant_conv.conv.bias"]
    with pytest.raises(RuntimeError, match="quant_conv.conv.bias"):
        vae.load_public_state_dict(bad)
    fixed = VideoVAE(VAEConfig.from_preset("mugv-compat", latent_mean=(0.5,) * 4, **TINY_COMPAT), kernels=False)
    with pytest.raises(ValueError, match="differs from config.latent_mean"):
        fixed.load_public_state_dict(sd)
