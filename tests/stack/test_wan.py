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
    assert wan_config_from_state_dict(ref.state_dict()) == WAN_FLAVORS["1.3b"]
    with torch.device("meta"):
        ours = WanDiT(WAN_FLAVORS["1.3b"])
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for k, v in ours.state_dict().items():
        assert v.shape == ref.state_dict()[k].shape, k


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
