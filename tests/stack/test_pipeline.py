"""The released MUG-V pipeline: ``vae.pt``/``dit.pt`` in the released key layout (small random
weights written by an independent re-implementation of the public modules), the loaders, and
:class:`mugv.pipeline.MUGVPipeline` against the public pipeline's reference, seed for seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mugv.diffusion import MUGV_NEGATIVE_PROMPT, RectifiedFlow
from mugv.models import MUGDiT, VideoVAE
from mugv.models.released import dit_config_from_state_dict, load_released_dit
from mugv.models.vae_released import ReleasedVideoVAE
from mugv.pipeline import (ASPECT_RATIO_720P, DURATIONS, MUGVPipeline, frame_size, num_frames_for, read_image,
                           save_video, to_uint8)
from tests.stack import _mugv_public_pipeline as pub
from tests.stack._fake_t5 import PROMPT, TEXT_DIM, FakeT5
from tests.stack._mugv_public_ref import PublicMUGDiT

# the released structure (4 SDXL levels = 8x, a 4-level temporal VAE = 8x) at reduced widths
SPATIAL = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, groups=32)
TEMPORAL = dict(filters=32, num_res_blocks=1, channel_multipliers=(1, 1, 2, 2), temporal_groups=32)
HIDDEN, DEPTH = 144, 2  # head_dim 72 -> 2 heads; TEXT_DIM: the fake T5's width


def _perturb(module, gen, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-layout directory with ``vae.pt`` and ``dit.pt``; returns (dir, ref_vae, ref_dit)."""
    d = tmp_path_factory.mktemp("released")
    return (d, *write_released(d))


def write_released(d):
    """Write ``vae.pt`` and ``dit.pt`` of the reduced released structure to ``d``; returns the
    public reference modules ``(vae, dit)`` they hold."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = pub.PubVAEPipeline(**SPATIAL, **TEMPORAL).eval()
    _perturb(vae, gen)
    torch.save(vae.state_dict(), d / "vae.pt")
    dit = PublicMUGDiT(hidden_size=HIDDEN, depth=DEPTH, num_heads=HIDDEN // 72, text_dim=TEXT_DIM).eval()
    _perturb(dit, gen, 0.02)
    torch.save(dit.state_dict(), d / "dit.pt")
    return vae, dit



pytestmark = pytest.mark.usefixtures("one_thread")


def _image(tmp_path, h=40, w=56):
    from PIL import Image

    arr = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    p = tmp_path / "ref.png"
    Image.fromarray(arr).save(p)
    return p


# ----------------------------------------------------------------------------------------- tables


def test_tables_match_the_public_code():
    assert ASPECT_RATIO_720P == pub.ASPECT_RATIO_720P
    assert DURATIONS == pub.NUM_FRAMES_MAP
    assert frame_size("16:9") == (1280, 720) and frame_size("3:4") == (832, 1110)
    assert num_frames_for("5s") == 105 and num_frames_for("3s") == 73
    assert MUGV_NEGATIVE_PROMPT == pub.NEGATIVE
    with pytest.raises(ValueError, match="16:9"):
        frame_size("2:1")
    with pytest.raises(ValueError, match="5s"):
        num_frames_for("4s")


# ----------------------------------------------------------------------------------------- VAE


def test_released_vae_loads_strictly_and_matches_the_public_pipeline(released):
    d, ref, _ = released
    sd = torch.load(d / "vae.pt", weights_only=True)
    assert {"scale", "shift", "logvar", "spatial_vae.module.encoder.conv_out.weight",
            "spatial_vae.module.decoder.conv_in.weight", "temporal_vae.encoder.conv_in.conv.weight"} <= set(sd)
    vae = VideoVAE.from_released(d, dtype=torch.float32, kernels=False)
    assert vae.preset == "mugv-released" and vae.spatial_vae.compression == 8 and vae.num_latent_frames(105) == ref.latent_frames(105) == 14
    own = vae.state_dict()
    assert set(sd) - set(own) == {"spatial_vae.module." + k for k in
                                  ("encoder.conv_norm_out.weight", "encoder.conv_norm_out.bias",
                                   "encoder.conv_out.weight", "encoder.conv_out.bias",
                                   "decoder.conv_in.weight", "decoder.conv_in.bias")}
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # 8k+1: first frame x8
    with torch.no_grad():
        mean = vae.encode(x).mean
        ref_mean = ref.encode(x, sample=False)
        assert mean.shape == (1, 24, 2, 2, 3)
        assert (mean - ref_mean).abs().max() < 1e-4
        out, ref_out = vae.decode(mean, num_frames=9), ref.decode(ref_mean, num_frames=9)
    assert out.shape == (1, 3, 9, 16, 24)
    assert (out - ref_out).abs().max() < 1e-4


def test_released_vae_micro_frame_chunks_and_posterior_draws(released):
    """micro_frame_size chunks (8 frames here, so a 9-frame clip, first frame repeated, spans two) and the public
    posterior draw (CPU randn per chunk) give the public latents for the same seed."""
    from mugv.pipeline import sample_posterior

    d, ref, _ = released
    vae = ReleasedVideoVAE.from_released(d / "vae.pt", dtype=torch.float32, kernels=False, micro_frame_size=8)
    ref.micro_frame_size = 8
    try:
        x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        with torch.no_grad():
            torch.manual_seed(5)
            z_ref = ref.encode(x)
            z = vae.normalize(sample_posterior(vae.encode(x, normalize=False), 1, torch.Generator().manual_seed(5)))
            assert z.shape == (1, 24, 2, 2, 2)
            assert (z - z_ref).abs().max() < 1e-4
            assert (vae.decode(z, 9) - ref.decode(z_ref, 9)).abs().max() < 1e-4
    finally:
        ref.micro_frame_size = 48


def test_spatial_stage_through_the_fused_group_norm():
    """kernels=True (mugv_kernels.group_norm_silu, the Triton kernel under the interpreter) gives the
    plain-torch result, encoder and decoder (two levels, few groups: the interpreter is slow)."""
    from mugv.models.vae_spatial import SpatialVAE

    torch.manual_seed(3)
    sp = SpatialVAE(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=2)
    _perturb(sp, torch.Generator().manual_seed(3))
    x = torch.rand(1, 3, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        a, da = sp.encode(x), sp.decode(torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(4)))
        sp.set_kernels(False)
        b, db = sp.encode(x), sp.decode(torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(4)))
    assert (a - b).abs().max() < 1e-4 and (da - db).abs().max() < 1e-4


def test_released_vae_real_widths_on_meta():
    """The real released structure: our module and the reference have the same keys and shapes, and
    the reference's full state dict (unused layers included) is accepted by the shape inference."""
    with torch.device("meta"):
        ref = pub.PubVAEPipeline()
    sd = ref.state_dict()
    with torch.device("meta"):
        ours = ReleasedVideoVAE._from_state_dict_shapes(sd, "meta")
    own = ours.state_dict()
    unused = {k for k in sd if k.startswith(("spatial_vae.module.encoder.conv_norm_out",
                                              "spatial_vae.module.encoder.conv_out",
                                              "spatial_vae.module.decoder.conv_in"))}
    assert set(sd) - unused == set(own)
    assert all(own[k].shape == sd[k].shape for k in own)
    ours.load_state_dict(sd, strict=True, assign=True)
    n_ref = sum(v.numel() for k, v in sd.items() if k not in unused)
    assert ours.num_params() + 2 * 24 == n_ref  # scale and shift are buffers
    assert ours.spatial_vae.feature_channels == 512 and ours.config.filters == 128


def test_released_preset_builds_the_released_structure(released):
    """The preset name resolves to the two-stage released VAE: the config names both stages, and
    VideoVAE.from_preset gives a ReleasedVideoVAE whose keys and shapes are the released file's
    (the real widths on meta against the reference, reduced widths against the fixture's vae.pt)."""
    from dataclasses import replace

    from mugv.models import VAEConfig
    from mugv.models.vae import MUGV_LATENT_MEAN, MUGV_LATENT_STD

    cfg = VAEConfig.from_preset("mugv-released")
    assert (cfg.arch, cfg.in_out_channels, cfg.spatial_block_out_channels, cfg.frame_batch) == \
        ("mugv-released", 3, (128, 256, 512, 512), 4)
    assert (cfg.spatial_compression, cfg.temporal_compression, cfg.latent_channels) == (8, 8, 24)
    assert cfg.latent_mean == MUGV_LATENT_MEAN and cfg.latent_std == MUGV_LATENT_STD
    assert cfg.temporal_stage() == VAEConfig.from_preset("mugv-compat")
    with torch.device("meta"):
        vae, ref = VideoVAE.from_preset("mugv-released"), pub.PubVAEPipeline()
    assert isinstance(vae, ReleasedVideoVAE) and vae.config == cfg and vae.preset == "mugv-released"
    unused = {"spatial_vae.module." + k for k in ("encoder.conv_norm_out.weight", "encoder.conv_norm_out.bias",
                                                   "encoder.conv_out.weight", "encoder.conv_out.bias",
                                                   "decoder.conv_in.weight", "decoder.conv_in.bias")}
    want = {k: v.shape for k, v in ref.state_dict().items() if k not in unused}
    assert {k: v.shape for k, v in vae.state_dict().items()} == want
    # reduced widths: the fixture's file loads strictly into the preset's module and encodes the same
    d, _, _ = released
    small = dict(spatial_block_out_channels=SPATIAL["block_out_channels"],
                 spatial_layers_per_block=SPATIAL["layers_per_block"], spatial_num_groups=SPATIAL["groups"],
                 filters=TEMPORAL["filters"], num_res_blocks=TEMPORAL["num_res_blocks"],
                 channel_multipliers=TEMPORAL["channel_multipliers"], num_groups=TEMPORAL["temporal_groups"])
    ours = VideoVAE.from_preset("mugv-released", kernels=False, **small).eval()
    loaded = VideoVAE.from_released(d, dtype=torch.float32, kernels=False)
    strip = lambda c: replace(c, latent_mean=None, latent_std=None)  # noqa: E731 (the file's, float32-rounded)
    assert strip(ours.config) == strip(loaded.config)
    sd = {k: v for k, v in torch.load(d / "vae.pt", weights_only=True).items() if k not in unused}
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.encode(x).mean, loaded.encode(x).mean)
    with pytest.raises(ValueError, match="from_preset"):
        VideoVAE(cfg)
    with pytest.raises(ValueError, match="spatial_num_groups"):
        VAEConfig.from_preset("mugv-released", spatial_block_out_channels=(48, 48))
    with pytest.raises(ValueError, match="mugv-released"):
        VAEConfig.from_preset("compact").temporal_stage()
    with pytest.raises(ValueError, match="tile_size"):
        VideoVAE.from_config(VAEConfig.from_preset("compact"), tile_size=64)


def test_released_vae_errors(tmp_path, released):
    with pytest.raises(FileNotFoundError, match="vae.pt"):
        ReleasedVideoVAE.from_released(tmp_path)
    torch.save({"x_embedder.proj.weight": torch.zeros(1)}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="not a released MUG-V VAE.*x_embedder"):
        ReleasedVideoVAE.from_released(tmp_path / "vae.pt")
    d, _, _ = released
    sd = torch.load(d / "vae.pt", weights_only=True)
    sd.pop("logvar")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="logvar") as e:
        ReleasedVideoVAE.from_released(tmp_path / "vae.pt")
    assert "extra.weight" in str(e.value)


# ----------------------------------------------------------------------------------------- DiT


def test_released_dit_custom_config_bf16_and_forward(released):
    d, _, ref = released
    model = MUGDiT.from_released(d / "dit.pt")  # default bf16
    assert model.cfg.depth == DEPTH and model.cfg.hidden_size == HIDDEN and model.cfg.num_heads == 2
    assert model.cfg.text_dim == TEXT_DIM and model.cfg.flavor is None
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    model = load_released_dit(d, dtype=torch.float32, kernels=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, 3, 4, 6, generator=g)
    y, mask = FakeT5().encode([PROMPT, "short one"])
    t = torch.tensor([700.0, 300.0])
    fps = torch.tensor([30.0])
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    fi = torch.arange(5)[None].repeat(2, 1)
    with torch.no_grad():
        out = model(x, t, y, mask=mask, x_mask=x_mask, fps=fps)
        want = ref(x, t, y, mask, x_mask, fps, fi)
    assert (out - want).abs().max() < 1e-4


def test_released_dit_10b_shapes_on_meta():
    with torch.device("meta"):
        ref = PublicMUGDiT(hidden_size=3456, depth=56, num_heads=48, text_dim=4096)
    sd = ref.state_dict()
    cfg = dit_config_from_state_dict(sd)
    assert cfg.flavor == "10b" and cfg.num_heads == 48 and cfg.depth == 56
    model = load_released_dit(sd, device="meta")
    assert model.num_params() == sum(v.numel() for v in ref.state_dict().values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_released_dit_errors(tmp_path, released):
    d, _, _ = released
    with pytest.raises(FileNotFoundError, match="dit.pt"):
        load_released_dit(tmp_path)
    with pytest.raises(ValueError, match="not a MUG-V DiT.*spatial_vae.*vae.pt"):
        load_released_dit(d / "vae.pt")


# ----------------------------------------------------------------------------------------- sampler


def test_public_sampler_draws_are_bitwise_the_public_loop(released):
    """RectifiedFlow.sample(noise_draws='public', timesteps=public_timesteps(...)) with the same model
    callable reproduces the public RFlow.sample bit for bit, I2V masks included."""
    d, _, ref = released
    y, mask = FakeT5().encode([PROMPT, MUGV_NEGATIVE_PROMPT])
    flow = RectifiedFlow.from_preset("mugv")
    for cond in (False, True):
        torch.manual_seed(11)
        z0 = torch.randn(1, 24, 3, 4, 4)
        x_mask = torch.ones(1, 3)
        if cond:
            x_mask[:, :1] = 0
        args = dict(fps=torch.tensor([30.0]), height=torch.tensor([32.0]), width=torch.tensor([32.0]),
                    num_frames=torch.tensor([3.0]), frame_indice=torch.arange(5)[None])
        torch.manual_seed(12)
        want = pub.rflow_sample(ref, z0.clone(), y, mask, args, x_mask, num_steps=4)
        ts = flow.public_timesteps(4, height=32, width=32, num_frames=3)

        def model(x, t, yy, mask=None, x_mask=None, fps=None):
            xm = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool) if x_mask is None else x_mask
            return ref(x, t, yy, mask, xm, fps, torch.arange(5)[None].repeat(x.shape[0], 1))

        got = flow.sample(model, z0.clone(), y[:1], y[1:], mask=mask[:1], mask_null=mask[1:],
                          fps=torch.tensor([30.0]), cond_latents=z0[:, :, :1] if cond else None, num_steps=4,
                          timesteps=ts, noise_draws="public", generator=torch.Generator().manual_seed(12))
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_timesteps_at_720p_5s(dtype):
    """The schedule equals the public timestep_transform bit for bit, with the shift ratio
    evaluated from height/width/latent-frame tensors of the model dtype (bf16 rounds it)."""
    flow = RectifiedFlow.from_preset("mugv")
    for h, w in (frame_size("16:9"), frame_size("3:4")):
        got = flow.public_timesteps(25, height=h, width=w, num_frames=14, ratio_dtype=dtype)
        hh, ww, nf = (torch.tensor([v], dtype=dtype) for v in (h, w, 14))
        want = [pub.timestep_transform(torch.tensor([(1.0 - i / 25) * 1000]), hh, ww, nf) for i in range(25)]
        assert len(got) == 25 and all(g.dtype == torch.float32 and torch.equal(g, x) for g, x in zip(got, want))
        assert got[0].item() == 1000.0 and all(a.item() > b.item() for a, b in zip(got, got[1:]))


# ----------------------------------------------------------------------------------------- tiling


def _spatial_tiny(frame_batch=4):
    """A 2-level truncated SDXL stage (compression 2) with perturbed random weights, plain torch."""
    from mugv.models.vae_spatial import SpatialVAE

    torch.manual_seed(0)
    sp = SpatialVAE(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, frame_batch=frame_batch)
    _perturb(sp, torch.Generator().manual_seed(1))
    return sp.set_kernels(False).eval()


def _periodic(channels, T, H, W, period, seed):
    """A smooth field with per-channel phases, periodic with ``period`` along H and W."""
    import math

    yy, xx = torch.meshgrid(torch.arange(float(H)), torch.arange(float(W)), indexing="ij")
    ph = torch.rand(channels, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    f = torch.sin(2 * math.pi * xx / period + ph) + torch.cos(2 * math.pi * yy / period + 2 * ph)
    return f[None, :, None].expand(1, channels, T, H, W).contiguous()


def test_tiled_map_is_exact_for_cellwise_maps():
    """The tile layout and blending alone: a map that acts on each cell by itself comes out
    exactly (fp64), for encode-like (8 px -> 1) and decode-like (1 -> 8 px) cells, uneven tiles."""
    import torch.nn.functional as F

    from mugv.models.vae_spatial import _tile_starts, tiled_map

    assert _tile_starts(160, 64, 16) == [0, 48, 96] and _tile_starts(90, 64, 16) == [0, 26]
    assert _tile_starts(64, 64, 16) == [0] and _tile_starts(5, 64, 16) == [0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8 * 13, 8 * 21, generator=g, dtype=torch.float64)
    enc = lambda v: F.avg_pool2d(v, 8) * 3  # noqa: E731
    assert (tiled_map(enc, x, tile=5, overlap=2, f_in=8, f_out=1) - enc(x)).abs().max() < 1e-12
    z = torch.randn(1, 4, 13, 21, generator=g, dtype=torch.float64)[:, :, :, ::2]  # non-contiguous, 11 wide
    dec = lambda v: F.interpolate(v, scale_factor=8.0, mode="nearest").sin()  # noqa: E731
    assert (tiled_map(dec, z, tile=6, overlap=3, f_in=1, f_out=8) - dec(z)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="overlap"):
        tiled_map(enc, x, tile=4, overlap=3, f_in=8, f_out=1)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_map(enc, x[:, :, :, :-1], tile=4, overlap=1, f_in=8, f_out=1)


def test_spatial_tiling_off_is_exact_and_on_departs_boundedly():
    """Off (the default) is the untiled result bitwise, and so is a frame that fits one tile. On, a
    smooth periodic input (the tiles hold whole periods, so their GroupNorm statistics and attention
    keys match the frame's up to edge effects) decodes close to the untiled result, a random one
    departs more (the documented departure), and encode stays within a bounded error."""
    sp = _spatial_tiny()
    smooth = _periodic(16, 2, 24, 40, 8, 2)
    rough = torch.randn(1, 16, 2, 24, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = {k: sp.decode(z) for k, z in (("smooth", smooth), ("rough", rough))}
        sp.set_tiling(80)  # 80 px >= the 48 x 80 frame: one tile
        assert torch.equal(sp.decode(smooth), base["smooth"])
        sp.set_tiling(32, 16)  # 16 x 16-cell tiles, 8 cells shared
        rel = {}
        for k, z in (("smooth", smooth), ("rough", rough)):
            out = sp.decode(z)
            assert out.shape == base[k].shape == (1, 3, 2, 48, 80)
            err = (out - base[k]).abs()
            rel[k] = (err.mean() / base[k].std()).item(), (err.max() / base[k].std()).item()
        sp.set_tiling(None)
        assert torch.equal(sp.decode(smooth), base["smooth"])
        x = _periodic(3, 2, 48, 80, 16, 4)
        enc = sp.encode(x)
        sp.set_tiling(32, 16)
        enc_err = (sp.encode(x) - enc).abs() / enc.std()
    assert 0 < rel["smooth"][0] < 0.04 and rel["smooth"][1] < 0.25, rel  # measured 0.019 / 0.10
    assert rel["rough"][0] > 1.5 * rel["smooth"][0] and rel["rough"][1] > 2 * rel["smooth"][1], rel  # 0.036 / 0.34
    assert 0 < enc_err.mean() < 0.15 and enc_err.max() < 1.0, enc_err  # measured 0.072 / 0.46
    with pytest.raises(ValueError, match="multiple of 2"):
        sp.set_tiling(31)
    with pytest.raises(ValueError, match="tile_overlap"):
        sp.set_tiling(32, 18)


def test_spatial_tiling_lowers_the_counted_peak_per_micro_batch():
    """The working set of one micro-batch (two frames, counted as the live bytes its ops allocate)
    drops with tiles, for decode and encode; the counter itself counts a known sequence right."""
    from mugv.profiling import LiveTensorBytes

    x = torch.randn(1000)
    with LiveTensorBytes() as c:
        a = x * 2
        b = a.view(10, 100)  # a view: no new bytes
        c2 = b * 2  # a, c2 alive
        del a, b
        d = c2 + 1  # c2, d alive
        del c2
    assert (c.peak, c.live) == (8000, 4000) and d.numel() == 1000
    sp = _spatial_tiny(frame_batch=None)
    z, x = _periodic(16, 2, 24, 40, 8, 2), _periodic(3, 2, 48, 80, 16, 4)
    peaks = {}
    with torch.no_grad():
        for tile in (None, 32):
            sp.set_tiling(tile)
            with LiveTensorBytes() as dec:
                sp.decode(z)
            with LiveTensorBytes() as enc:
                sp.encode(x)
            peaks[tile] = dec.peak, enc.peak
    assert peaks[32][0] < 0.5 * peaks[None][0] and peaks[32][1] < 0.6 * peaks[None][1], peaks  # measured 0.34 / 0.40


# ----------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe(released):
    d, _, _ = released
    return MUGVPipeline.from_released(d, text_encoder=FakeT5(), device="cpu", dtype=torch.float32, kernels=False)


def _reference(released, image, T, steps, seed):
    _, vae, dit = released
    y, mask = FakeT5().encode([f"{PROMPT} aesthetic score: 6.0.", MUGV_NEGATIVE_PROMPT])
    img = None if image is None else read_image(image, 16, 32)
    with torch.no_grad():
        return pub.generate(dit, vae, y, mask, image=img, num_frames=T, height=16, width=32, steps=steps,
                            seed=seed)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_pipeline_matches_the_public_pipeline_seed_for_seed(pipe, released, tmp_path, i2v):
    image = _image(tmp_path) if i2v else None
    kw = dict(image=image, height=16, width=32, num_frames=9, steps=3, seed=7, progress=False)
    frames = pipe(PROMPT, **kw)
    z = pipe.last_latents
    z_ref, video_ref = _reference(released, image, 9, 3, 7)
    assert z.shape == z_ref.shape == (1, 24, 2, 2, 4)
    err = (z - z_ref).abs().max().item()
    assert err < 1e-4, err
    want = pub.to_uint8(video_ref)
    assert frames.shape == want.shape == (9, 16, 32, 3) and frames.dtype == torch.uint8
    assert (frames.int() - want.int()).abs().max() <= 1
    if i2v:  # the reference frame is prepended as it was read
        assert torch.equal(frames[0], to_uint8(read_image(image, 16, 32))[0])
    else:  # another seed, other latents
        other = pipe(PROMPT, output="latents", **{**kw, "seed": 8, "steps": 1})
        assert torch.equal(pipe(PROMPT, output="latents", **{**kw, "steps": 1}), pipe.last_latents)
        assert (other - pipe.last_latents).abs().max() > 1e-2


def test_offload_blocks_is_a_no_op_on_cpu(released):
    d, _, _ = released
    base = MUGVPipeline.from_released(d, text_encoder=FakeT5(), device="cpu", dtype=torch.float32, kernels=False)
    for mode in ("model", "blocks"):
        p = MUGVPipeline.from_released(d, text_encoder=FakeT5(), device="cpu", dtype=torch.float32, kernels=False,
                                       offload=mode)
        kw = dict(height=16, width=32, num_frames=9, steps=2, seed=1, progress=False, output="latents")
        assert torch.equal(p(PROMPT, **kw), base(PROMPT, **kw))
        if mode == "blocks":
            assert p.streamer.prefetches == 2 * DEPTH  # every block fetched once per step
            assert set(p.profile) == {"encode_text", "sample"}


def test_pipeline_vae_tiling_option(pipe):
    """vae_tiling: off by default (the public output); a frame within one tile is the untiled
    result; smaller tiles change the decoded frames only (T2V latents are unchanged) and the VAE's
    setting is restored after the call; a VAE that cannot tile is refused."""
    from mugv.models import VAEConfig

    kw = dict(height=16, width=32, num_frames=9, steps=1, seed=3, progress=False)
    base = pipe(PROMPT, **kw)
    z = pipe.last_latents.clone()
    assert torch.equal(pipe(PROMPT, vae_tiling=True, **kw), base)  # 512-px tiles: one tile
    tiled = pipe(PROMPT, vae_tiling=16, **kw)
    assert torch.equal(pipe.last_latents, z) and tiled.shape == base.shape and not torch.equal(tiled, base)
    assert pipe.vae.tile_size is None
    assert torch.equal(pipe(PROMPT, vae_tiling=False, **kw), base)
    with pytest.raises(ValueError, match="vae_tiling"):
        pipe(PROMPT, vae_tiling=-8, **kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(PROMPT, vae_tiling=12, **kw)
    with pytest.raises(ValueError, match="tiles frames"):
        MUGVPipeline(pipe.dit, VideoVAE(VAEConfig.from_preset("compact")), pipe.text_encoder, vae_tiling=True)
    # the decoding progress: one tick for the temporal stage, one per spatial micro-batch of 4 frames
    ticks = []
    with torch.no_grad():
        pipe.vae.decode(z, num_frames=9, callback=lambda: ticks.append(1))
    assert len(ticks) == 1 + pipe.vae.spatial_vae.micro_batches(9) == 1 + 3


def test_pipeline_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="aspect ratio"):
        pipe(PROMPT, aspect_ratio="2:1")
    with pytest.raises(ValueError, match="duration"):
        pipe(PROMPT, duration="7s")
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(PROMPT, height=40, width=32)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipe(PROMPT, image=tmp_path / "nope.png", height=32, width=32, num_frames=9)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="does not open"):
        pipe(PROMPT, image=bad, height=32, width=32, num_frames=9)
    with pytest.raises(ValueError, match="offload"):
        MUGVPipeline(pipe.dit, pipe.vae, pipe.text_encoder, offload="disk")
    with pytest.raises(FileNotFoundError, match="dit.pt"):
        MUGVPipeline.from_released(tmp_path, text_encoder=FakeT5())


def test_save_video_round_trip(tmp_path):
    import av

    frames = torch.from_numpy((np.random.default_rng(1).random((5, 32, 48, 3)) * 255).astype(np.uint8))
    p = save_video(frames, tmp_path / "out" / "clip.mp4", fps=20)
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        got = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert float(s.average_rate) == 20
    assert len(got) == 5 and got[0].shape == (32, 48, 3)
    with pytest.raises(ValueError, match="uint8"):
        save_video(frames.float(), tmp_path / "x.mp4", fps=20)
    with pytest.raises(ValueError, match="fps"):
        save_video(frames, tmp_path / "x.mp4", fps=0)


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A T5 encoder directory in the real format (random weights, d_model = the tiny DiT's text
    width) with the all-MiniLM tokenizer files (offline)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from mugv.text import minilm_path

    d = tmp_path_factory.mktemp("t5")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5EncoderModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def test_cli_generate_released(released, tiny_t5, tmp_path, capsys):
    import json

    import av

    from mugv.cli import main

    d, _, _ = released
    img = _image(tmp_path)
    out = tmp_path / "clip.mp4"
    base = ["generate", "--released", str(d), "--t5", str(tiny_t5), "--prompt", PROMPT, "--height", "16",
            "--width", "32", "--frames", "9", "--steps", "2", "--device", "cpu"]
    assert main([*base, "--image", str(img), "--profile", "--vae-tile", "16", "--out", str(out)]) == 0
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        assert float(s.average_rate) == 20  # the public mp4 rate; the model was conditioned on 30
    assert len(frames) == 9 and frames[0].shape == (16, 32, 3) and out.with_suffix(".png").exists()
    prof = json.loads(out.with_suffix(".profile.json").read_text())
    assert {"load", "encode_image", "encode_text", "sample", "decode", "write"} <= set(prof["stages"])
    assert all(v["seconds"] >= 0 for v in prof["stages"].values()) and prof["vae_tiling"] == 16
    assert prof["host_max_rss_bytes"] > 10 * 2**20
    capsys.readouterr()
    for argv, msg in (
        (["generate", "--released", str(tmp_path), "--t5", str(tiny_t5), "--prompt", "x", "--out", str(out)],
         "dit.pt"),
        ([*base[:-2], "--aspect-ratio", "2:1", "--out", str(out)], "aspect ratio"),
        ([*base[:-2], "--duration", "9s", "--out", str(out)], "duration"),
        ([*base, "--t5", str(tmp_path / "no_t5"), "--out", str(out)], "no_t5"),
        ([*base, "--image", str(tmp_path / "none.png"), "--out", str(out)], "none.png"),
        ([*base, "--vae-tile", "12", "--out", str(out)], "--vae-tile"),
        (["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--vae-tile", "512", "--out", str(out)],
         "--released"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_text_encoder_leaves_the_device_after_encoding_in_every_mode(pipe):
    """The text encoder is offloaded after encoding whatever ``offload`` says; the DiT and VAE only
    with ``offload`` model/blocks; ``offload_text_encoder=False`` keeps it."""
    for mode in ("none", "model", "blocks"):
        p = MUGVPipeline(pipe.dit, pipe.vae, pipe.text_encoder, offload=mode)
        assert p._offloads("encode_text")
        assert p._offloads("sample") == p._offloads("decode") == (mode != "none")
        kept = MUGVPipeline(pipe.dit, pipe.vae, pipe.text_encoder, offload=mode, offload_text_encoder=False)
        assert kept._offloads("encode_text") == (mode != "none")
