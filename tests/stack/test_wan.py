"""The enhancer's Wan DiT (mugv.models.wan): strict loading of the released key layout and
equality with the independent reference of the public forward (tests/stack/_wan_public_ref.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mugv.models.wan import WAN_FLAVORS, WanDiT, load_wan_dit, wan_config_from_state_dict
from tests.helpers import assert_close
from tests.stack._wan_public_ref import PublicWanModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=24, text_len=8, freq_dim=16)


def public_model(seed: int = 0) -> PublicWanModel:
    """The public module tree with every parameter random (zero-init layers included)."""
    torch.manual_seed(seed)
    ref = PublicWanModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    ref = public_model()
    path = tmp_path_factory.mktemp("enhancer") / "dit_i2v.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def test_flavor_from_the_released_layout():
    with torch.device("meta"):
        ref = PublicWanModel(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
    want = ref.state_dict()
    assert wan_config_from_state_dict(want) == WAN_FLAVORS["1.3b"]
    with torch.device("meta"):
        ours = WanDiT(WAN_FLAVORS["1.3b"])
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in want.items()}


@pytest.mark.parametrize("i2v,kernels", [(True, True), (True, "reference"), (False, "reference")])
def test_forward_equals_public(released, i2v, kernels):
    """kernels=True runs the Triton kernels (interpreted on CPU), "reference" their PyTorch references."""
    ref, path = released
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels=kernels)  # strict=True inside
    g = torch.Generator().manual_seed(1)
    B, T = (1, 2) if kernels is True else (2, 3)  # the interpreter runs a program per row: keep it small
    x = torch.randn(B, 16, T, 2, 4, generator=g)
    y = torch.randn(B, 16, T, 2, 4, generator=g)
    ctx = torch.randn(B, 5, 24, generator=g)
    t = torch.tensor([300.0, 730.0])[:B]
    with torch.no_grad():
        if i2v:
            want = ref(x, t, ctx, y=y, i2v=True, timestep_t0=torch.zeros(B))
            got = model(x, t, ctx, y=y, x_mask=torch.arange(T) == 0)
        else:
            want = ref(x, t, ctx)
            got = model(x, t, ctx)
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if i2v:  # the t0 tokens really differ from the plain ones
        with torch.no_grad():
            plain = model(x, t, ctx, y=y)
        assert (plain[:, :, 0] - got[:, :, 0]).abs().max() > 1e-3


def test_token_mask_equals_frame_mask(released):
    _, path = released
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    x, ctx, t = torch.randn(1, 16, 2, 2, 4), torch.randn(1, 3, 24), torch.tensor([500.0])
    frames = torch.tensor([True, False])
    with torch.no_grad():
        a = model(x, t, ctx, y=x, x_mask=frames)
        b = model(x, t, ctx, y=x, x_mask=frames.repeat_interleave(2))  # 1 x 2 tokens per frame
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_inputs(released, tmp_path):
    ref, path = released
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_wan_dit(tmp_path / "nope.safetensors")
    sd = dict(ref.state_dict())
    sd["blocks.0.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    with pytest.raises(ValueError, match="blocks.0.extra"):
        load_wan_dit(bad, num_heads=2, text_len=8)
    with pytest.raises(ValueError, match="not a Wan DiT"):
        wan_config_from_state_dict({"x": torch.zeros(1)})
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    ctx = torch.randn(1, 3, 24)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(torch.randn(1, 16, 2, 3, 4), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match="text_len"):
        model(torch.randn(1, 16, 2, 2, 2), torch.tensor([1.0]), torch.randn(1, 9, 24))
    with pytest.raises(ValueError, match="x_mask"):
        model(torch.randn(1, 16, 2, 2, 2), torch.tensor([1.0]), ctx, x_mask=torch.tensor([1, 0]))


# ---------------------------------------------------------------------------- LoRA + SDEdit

RANK, ALPHA = 4, 4.0
TARGET = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def lora_weights(ref: PublicWanModel, seed: int = 2) -> dict[str, torch.Tensor]:
    """Random adapters for every target linear, in the released key layout (peft names under the
    public training module's ``pipe.dit.`` prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith("." + t) for t in TARGET):
            sd[f"pipe.dit.{name}.lora_A.default.weight"] = 0.3 * torch.randn(RANK, mod.in_features, generator=g)
            sd[f"pipe.dit.{name}.lora_B.default.weight"] = 0.3 * torch.randn(mod.out_features, RANK, generator=g)
    return sd


def merged_public(ref: PublicWanModel, lora: dict[str, torch.Tensor]) -> PublicWanModel:
    """The public model with ``W + (alpha / r) B A`` written into each adapted linear."""
    out = public_model()
    out.load_state_dict(ref.state_dict())
    mods = dict(out.named_modules())
    with torch.no_grad():
        for k, a in lora.items():
            if ".lora_A." in k:
                name = k[len("pipe.dit."):].split(".lora_A.")[0]
                b = lora[k.replace("lora_A", "lora_B")]
                mods[name].weight.add_((ALPHA / RANK) * (b @ a))
    return out


@pytest.fixture(scope="module")
def with_lora(released, tmp_path_factory):
    ref, path = released
    lora = lora_weights(ref)
    assert len(lora) == 2 * 2 * 10  # 2 blocks x (self q,k,v,o + cross q,k,v,o + ffn.0, ffn.2) x (A, B)
    lpath = tmp_path_factory.mktemp("lora") / "pytorch_model.bin"
    torch.save(lora, lpath)
    return merged_public(ref, lora), path, lpath


@pytest.mark.parametrize("merge", [True, False])
def test_lora_forward_and_one_step_equal_public(with_lora, merge):
    from peft.tuners.lora import LoraLayer

    from mugv.enhance import enhance_latents
    from mugv.models.wan_lora import apply_lora
    from tests.stack._wan_public_ref import public_enhance

    ref, path, lpath = with_lora
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    info = apply_lora(model, lpath, merge=merge)
    assert (info.rank, info.alpha, info.merged, len(info.modules)) == (RANK, ALPHA, merge, 20)
    n_peft = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert n_peft == (0 if merge else 20)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 16, 3, 2, 4, generator=g)
    noise = torch.randn(1, 16, 3, 2, 4, generator=g)
    pos, neg = torch.randn(1, 5, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    with torch.no_grad():
        want = ref(z0, torch.tensor([300.0]), pos, y=z0, i2v=True, timestep_t0=torch.zeros(1))
        got = model(z0, torch.tensor([300.0]), pos, y=z0, x_mask=torch.arange(3) == 0)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        want = public_enhance(ref, z0, noise, pos, neg, steps=1, cfg=2.0, sigma=0.3, shift=1.0)
    got = enhance_latents(model, z0, noise, pos, neg, sigma=0.3, steps=1, shift=1.0, cfg=2.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (got[:, :, 1:] - z0[:, :, 1:]).abs().max() > 1e-2  # the step changed the noised frames
    torch.testing.assert_close(got[:, :, :1], z0[:, :, :1], atol=0, rtol=0)  # frame 0 kept clean


def test_multi_step_and_shift_equal_public(with_lora):
    from mugv.enhance import enhance_latents
    from mugv.models.wan_lora import apply_lora
    from tests.stack._wan_public_ref import public_enhance

    ref, path, lpath = with_lora
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    apply_lora(model, lpath, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(1, 16, 2, 2, 2, generator=g), torch.randn(1, 16, 2, 2, 2, generator=g)
    pos = torch.randn(1, 4, 24, generator=g)
    with torch.no_grad():
        want = public_enhance(ref, z0, noise, pos, None, steps=3, cfg=1.0, sigma=0.5, shift=3.0)
    got = enhance_latents(model, z0, noise, pos, None, sigma=0.5, steps=3, shift=3.0, cfg=1.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_lora_bad_inputs(with_lora, tmp_path):
    from mugv.models.wan_lora import apply_lora

    ref, path, lpath = with_lora
    model = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    with pytest.raises(ValueError, match="rank mismatch.*rank 4.*rank=256"):
        apply_lora(model, lpath, rank=256)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        apply_lora(model, tmp_path / "missing.bin")
    sd = lora_weights(ref)
    sd["pipe.dit.blocks.0.norm3.lora_A.default.weight"] = torch.zeros(RANK, 32)
    sd["pipe.dit.blocks.0.norm3.lora_B.default.weight"] = torch.zeros(32, RANK)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="blocks.0.norm3"):
        apply_lora(model, tmp_path / "bad.bin")
    torch.save({"pipe.dit.head.head.weight": torch.zeros(1)}, tmp_path / "nolora.bin")
    with pytest.raises(ValueError, match="no LoRA weights"):
        apply_lora(model, tmp_path / "nolora.bin")


# ---------------------------------------------------------------------------- Wan2.1 VAE

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1, attn_scales=(), temperal_downsample=(True,),
                scale_factor_spatial=2, scale_factor_temporal=2)  # one down stage


def test_vae_full_layout_converts_exactly():
    from diffusers import AutoencoderKLWan

    from mugv.models.wan_vae import WAN21_VAE_CONFIG, convert_wan_vae_state_dict
    from tests.stack._wan_public_ref import original_wan_vae_shapes

    conv = convert_wan_vae_state_dict({k: torch.empty(s, device="meta") for k, s in original_wan_vae_shapes().items()})
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in WAN21_VAE_CONFIG.items()})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in conv.items()} == want


def test_vae_pth_loads_strictly_and_runs_on_mugv_convs(tmp_path):
    from mugv.models.wan_vae import load_wan_vae
    from tests.stack._wan_public_ref import original_wan_vae_shapes

    cfg = {k: v for k, v in TINY_VAE.items()}
    shapes = original_wan_vae_shapes(**{k: v for k, v in cfg.items() if k not in ("attn_scales", "scale_factor_spatial",
                                                                          "scale_factor_temporal")})
    g = torch.Generator().manual_seed(5)
    sd = {k: (1.0 + 0.1 * torch.randn(s, generator=g)) if k.endswith("gamma") else 0.2 * torch.randn(s, generator=g)
          for k, s in shapes.items()}
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(sd, pth)
    # the causal convs on mk.causal_conv3d's reference (its Triton kernel is tested against it in tests/kernels)
    ours = load_wan_vae(tmp_path, config=cfg, kernels="reference", tiling=False)  # finds Wan2.1_VAE.pth in the dir
    stock = load_wan_vae(pth, config=cfg, kernels=False, tiling=False)
    assert getattr(ours.vae, "_mugv_kernels", None) is not None
    video = torch.rand(1, 3, 5, 8, 8, generator=g) * 2 - 1
    z = ours.encode(video)
    assert z.shape == (1, 16, 3, 4, 4)  # TINY_VAE has one down stage: 2x in time (causal 5 -> 3), 2x in space
    torch.testing.assert_close(z, stock.encode(video), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.decode(z), stock.decode(z), atol=1e-4, rtol=1e-4)
    assert ours.decode(z).shape == video.shape
    with pytest.raises(ValueError, match="4k \\+ 1"):
        ours.encode(video[:, :, :4])
    with pytest.raises(FileNotFoundError, match="Wan VAE not found"):
        load_wan_vae(tmp_path / "nothing")
    torch.save({**sd, "encoder.extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        load_wan_vae(tmp_path / "bad.pth", config=cfg)


# ---------------------------------------------------------------------------- EnhancePipeline + CLI


class StubText:
    """A caption encoder stand-in: fixed random token states per caption (length from its words)."""

    def __call__(self, texts):
        from mugv.text import TextEmbeddings

        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) % 2**31)
            rows.append(torch.randn(min(len(t.split()), 8), 24, generator=g))
        L = max(r.shape[0] for r in rows)
        states = torch.stack([torch.cat([r, r.new_zeros(L - r.shape[0], 24)]) for r in rows])
        mask = torch.stack([torch.arange(L) < r.shape[0] for r in rows]).long()
        return TextEmbeddings.from_padded(states, mask)


def test_enhance_pipeline_equals_public_composition(with_lora, tmp_path):
    from mugv.enhance import ENHANCE_NEGATIVE_PROMPT
    from mugv.models.wan_lora import apply_lora
    from mugv.models.wan_vae import load_wan_vae
    from mugv.pipeline import EnhancePipeline
    from tests.stack._wan_public_ref import original_wan_vae_shapes, public_enhance

    ref, path, lpath = with_lora
    dit = load_wan_dit(path, num_heads=2, text_len=8, kernels="reference")
    apply_lora(dit, lpath)
    g = torch.Generator().manual_seed(6)
    shapes = original_wan_vae_shapes(base_dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1,
                                     temperal_downsample=(True,))
    torch.save({k: (1.0 + 0.1 * torch.randn(s, generator=g)) if k.endswith("gamma") else 0.2 * torch.randn(s, generator=g)
                for k, s in shapes.items()}, tmp_path / "Wan2.1_VAE.pth")
    vae = load_wan_vae(tmp_path, config=TINY_VAE, kernels="reference", tiling=False)
    pipe = EnhancePipeline(dit, vae, StubText())
    video = torch.randint(0, 256, (6, 17, 18, 3), dtype=torch.uint8, generator=g)
    with pytest.raises(ValueError, match="4k\\+1 frames.*multiples of 16.*--resize"):
        pipe(video, "a cat")
    out = pipe(video, "a  cat on a mat", seed=7, resize=True)
    assert out.shape == (5, 16, 16, 3) and out.dtype == torch.uint8
    assert set(pipe.last_timings) == {"encode_text", "encode_video", "denoise", "decode"}
    # the same by hand: the fitted frames, the VAE, the public sampler, the VAE
    x = video[:5, :16, 1:17].permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1
    z0 = vae.encode(x)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(7))
    pos = StubText()(["a cat on a mat"]).split()[0][None]
    neg = StubText()([ENHANCE_NEGATIVE_PROMPT]).split()[0][None]
    with torch.no_grad():
        z = public_enhance(ref, z0, noise, pos, neg, steps=1, cfg=2.0, sigma=0.3, shift=1.0)
    want = ((vae.decode(z)[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert (out.int() - want.int()).abs().max() <= 1


def test_enhance_cli_reports_missing_files(tmp_path, capsys):
    from mugv.cli import main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    (tmp_path / "wan").mkdir()
    rc = main(["enhance", "--input", str(clip), "--prompt", "x", "--released", str(tmp_path / "none"),
               "--wan", str(tmp_path / "wan"), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"])
    assert rc == 2 and "none" in capsys.readouterr().err
    (tmp_path / "rel").mkdir()
    rc = main(["enhance", "--input", str(clip), "--prompt", "x", "--released", str(tmp_path / "rel"),
               "--wan", str(tmp_path / "wan"), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"])
    assert rc == 2 and "dit_i2v.safetensors" in capsys.readouterr().err
    _, path = None, tmp_path / "rel" / "dit_i2v.safetensors"
    path.write_bytes(b"")
    rc = main(["enhance", "--input", str(clip), "--prompt", "x", "--released", str(tmp_path / "rel"),
               "--wan", str(tmp_path / "wan"), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "umT5 encoder not found" in err and str(tmp_path / "wan") in err


def test_vae_tiled_decode_close_to_whole_frames(tmp_path):
    """Tiles smaller than the frame: the encode stays whole-frame (identical); the decode is
    blended from tiles (its own numbers near the seams: only its shape and range are checked);
    tiles as large as the frame give the whole-frame decode exactly."""
    from mugv.models.wan_vae import load_wan_vae
    from tests.stack._wan_public_ref import original_wan_vae_shapes

    shapes = original_wan_vae_shapes(base_dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1,
                                     temperal_downsample=(True,))
    g = torch.Generator().manual_seed(8)
    torch.save({k: (1.0 + 0.05 * torch.randn(s, generator=g)) if k.endswith("gamma")
                else 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}, tmp_path / "Wan2.1_VAE.pth")
    whole = load_wan_vae(tmp_path, config=TINY_VAE, kernels="reference", tiling=False)
    tiled = load_wan_vae(tmp_path, config=TINY_VAE, kernels="reference", tiling=True)
    tiled.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                            tile_sample_stride_width=8)
    video = torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1
    z = whole.encode(video)
    torch.testing.assert_close(tiled.encode(video), z, atol=0, rtol=0)
    a, b = whole.decode(z), tiled.decode(z)
    assert a.shape == b.shape == video.shape
    assert torch.isfinite(b).all() and b.abs().max() <= 1.0
    tiled.vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
    torch.testing.assert_close(tiled.decode(z), a, atol=0, rtol=0)
