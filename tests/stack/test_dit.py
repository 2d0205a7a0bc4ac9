"""Tests of the MUG-V DiT (:mod:`mugv.models.dit`) and the checkpoint helpers.

The public-compatibility tests compare :class:`MUGDiT` with an independent plain-torch
re-implementation of the public forward (``tests/stack/_mugv_public_ref.py``) sharing the same
state dict; the kernel tests compare ``kernels=True`` (the :mod:`mugv_kernels` ops, run by
Triton's interpreter on the CPU where available) with ``kernels=False``. Models are
debug-width (288 = 4 heads of 72, the real head_dim and RoPE sections) with 2 blocks and a
small text width, on a few latent frames: everything runs in seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.stack._mugv_public_ref import PublicMUGDiT
from mugv.models import FLAVORS, CheckpointMismatchError, DiTConfig, MUGDiT, load_checkpoint, save_checkpoint

TEXT_DIM = 48


def _cfg(**kw) -> DiTConfig:
    return DiTConfig.from_flavor("debug", **{"depth": 2, "text_dim": TEXT_DIM, **kw})


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled (the real init zeroes the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(fan_in)))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for blk in getattr(model, "blocks", []):
            blk.scale_shift_table.mul_(0.0).add_(0.3 * torch.randn(blk.scale_shift_table.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pair():
    """(ours, public) with identical weights, fp32."""
    cfg = _cfg()
    ours = _randomize(MUGDiT(cfg, kernels=False))
    pub = PublicMUGDiT(cfg.in_channels, cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.text_dim)
    pub.load_state_dict(ours.state_dict(), strict=True)
    return ours, pub


def _inputs(B=2, T=3, H=4, W=6, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 24, T, H, W, generator=g)
    y = torch.randn(B, 1, L, TEXT_DIM, generator=g)
    t = torch.rand(B, generator=g) * 1000
    return x, t, y


# ----------------------------------------------------------------------------------------
# Config, flavors, parameter counts
# ----------------------------------------------------------------------------------------


def _expected_params(d: int, depth: int, heads: int, cin: int, text: int, mlp_ratio: float, patch=(1, 2, 2)) -> int:
    """Parameter count of the public architecture, written out from its layer list."""
    hd, p, m, f = d // heads, math.prod(patch), int(d * mlp_ratio), 256
    lin = lambda i, o: i * o + o  # noqa: E731  (Linear with bias)
    embed = cin * p * d + d  # x_embedder.proj (Conv3d)
    embed += 2 * (lin(f, d) + lin(d, d))  # t_embedder, fps_embedder
    embed += lin(d, 6 * d)  # t_block
    embed += lin(text, d) + lin(d, d)  # y_embedder.y_proj
    block = lin(d, 3 * d) + 2 * hd + lin(d, d)  # self-attention: qkv, q/k RMSNorm, proj
    block += 2 * d  # cross_attn_norm (affine)
    block += lin(d, d) + lin(d, 2 * d) + 2 * hd + lin(d, d)  # cross-attention
    block += lin(d, m) + lin(m, d)  # MLP
    block += 6 * d  # scale_shift_table
    final = lin(d, p * 2 * cin) + 2 * d
    return embed + depth * block + 2 * d + final


def test_flavors_and_overrides():
    for name, (d, h) in {"debug": (288, 4), "1b": (1152, 16), "4b": (2304, 32), "10b": (3456, 48), "18b": (4608, 64)}.items():
        c = DiTConfig.from_flavor(name)
        assert (c.hidden_size, c.num_heads, c.depth, c.head_dim, c.mlp_ratio) == (d, h, 56, 72, 4.0)
        assert (c.patch_size, c.in_channels, c.text_dim, c.out_channels, c.rope_sections) == ((1, 2, 2), 24, 4096, 48, (24, 24, 24))
    tiny = DiTConfig.from_flavor("tiny")
    assert tiny.depth <= 4 and tiny.hidden_size <= 96 and tiny.head_dim % 6 == 0 and tiny.text_dim == 384
    c = DiTConfig.from_flavor("1b", depth=3, hidden_size=144, num_heads=2, patch_size=[1, 1, 1], in_channels=4, text_dim=8, mlp_ratio=2.0)
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.in_channels, c.text_dim, c.mlp_ratio) == (3, 144, 2, (1, 1, 1), 4, 8, 2.0)
    with pytest.raises(ValueError, match="unknown DiT flavor"):
        DiTConfig.from_flavor("huge")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_flavor("debug", width=3)
    with pytest.raises(ValueError, match="multiple of 6"):
        DiTConfig.from_flavor("debug", hidden_size=256)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig.from_flavor("debug", num_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig.from_flavor("debug", patch_size=(1, 2))


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_meta_param_counts(name):
    cfg = DiTConfig.from_flavor(name)
    with torch.device("meta"):
        model = MUGDiT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    expected = _expected_params(cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.in_channels, cfg.text_dim, cfg.mlp_ratio)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == expected


def test_public_parameter_tree(pair):
    ours, pub = pair
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in pub.state_dict().items()}
    assert a == b


def test_meta_init_then_materialize():
    with torch.device("meta"):
        model = MUGDiT("tiny", kernels=False)
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(3))
    sd1 = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights(generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(sd1[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in sd1.values())
    # zero-initialized output layer: a fresh model predicts exactly 0
    x = torch.randn(1, 24, 2, 4, 4)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 3, 384), fps=torch.tensor([24.0]))
    assert out.shape == (1, 48, 2, 4, 4) and out.abs().max() == 0


# ----------------------------------------------------------------------------------------
# Public compatibility
# ----------------------------------------------------------------------------------------


def test_compat_t2v_matches_public(pair):
    ours, pub = pair
    ours.kernels = False
    x, t, y = _inputs(H=5, W=6)  # odd H: padded to the patch and cropped back
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    fps = torch.tensor([24.0])  # one fps for both samples, repeated as the public code does
    fi = torch.arange(5)[None]  # [1, T + 2], repeated to the batch (classifier-free guidance)
    with torch.no_grad():
        ref = pub(x, t, y, mask, torch.ones(2, 3, dtype=torch.bool), fps, fi)
        out = ours(x, t, y, mask=mask, fps=fps, frame_indice=fi, height=torch.tensor([720.0]))
    assert out.dtype == torch.float32 and out.shape == (2, 48, 3, 5, 6)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert ref.abs().mean() > 0.1  # a non-trivial output


@pytest.mark.parametrize("kernels", [False, True])
def test_compat_i2v_matches_public(pair, kernels):
    ours, pub = pair
    ours.kernels = kernels
    # few tokens on the kernel path: Triton's interpreter runs one program per row
    x, t, y = _inputs(T=3, H=2, W=4, L=3, seed=2) if kernels else _inputs(T=4, H=4, W=4, L=6, seed=2)
    T = x.shape[2]
    x_mask = torch.tensor([[False] + [True] * (T - 1), [False, False] + [True] * (T - 2)])
    fps = torch.tensor([30.0, 12.0])
    fi = torch.stack([torch.arange(T + 2), torch.arange(T + 2) * 2 + 3])
    fi[1, -1] = 600  # clamped to 479 like the public table
    L = y.shape[2]
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, L - 1 :] = 0  # a padded caption
    with torch.no_grad():
        ref = pub(x, t, y, mask, x_mask, fps, fi)
        out = ours(x, t, y, mask=mask, x_mask=x_mask, fps=fps, frame_indice=fi)
        out_float_mask = ours(x, t, y, mask=mask.bool(), x_mask=x_mask.float(), fps=fps, frame_indice=fi)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_float_mask, out, atol=0, rtol=0)
    # the conditioning frames really change the result (t0 modulation is used)
    with torch.no_grad():
        t2v = ours(x, t, y, mask=mask, fps=fps, frame_indice=fi)
    assert (t2v - out).abs().max() > 1e-3


KERNEL_OPS = ("ada_layer_norm", "gated_residual", "gated_residual_ada_layer_norm", "qk_norm_rope3d", "varlen_attention")


def test_kernels_on_off_forward_and_grad(monkeypatch):
    import mugv_kernels as mk

    calls = {}  # (op, backend keyword) -> count: the mugv_kernels ops each path really calls
    originals = {name: getattr(mk, name) for name in KERNEL_OPS}
    for name, op in originals.items():
        def counted(*a, _op=op, _name=name, **k):
            key = (_name, k.get("backend"))
            calls[key] = calls.get(key, 0) + 1
            return _op(*a, **k)

        monkeypatch.setattr(mk, name, counted)
    cfg = _cfg()
    model = _randomize(MUGDiT(cfg, kernels=True), seed=5)
    x, t, y = _inputs(T=2, H=2, W=3, L=3, seed=3)  # odd W: padding and crop in the graph
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    x_mask = torch.tensor([[False, True], [True, True]])
    fps = torch.tensor([24.0, 30.0])
    res = {}
    for kernels in (True, False):
        model.kernels = kernels
        model.zero_grad()
        xx = x.clone().requires_grad_()
        out = model(xx, t, y, mask=mask, x_mask=x_mask, fps=fps)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        res[kernels] = (out.detach(), xx.grad, {n: p.grad.clone() for n, p in model.named_parameters()})
        res[kernels] += (dict(calls),)
        calls.clear()
    # per block: 1 ada_layer_norm + 2 for the cross-attention q/k RMSNorm, 2 fused boundaries,
    # 1 gated residual, 1 qk_norm_rope3d, 2 varlen attentions; plus the final layer's norm
    expected = {"ada_layer_norm": 3 * 2 + 1, "gated_residual": 2, "gated_residual_ada_layer_norm": 4,
                "qk_norm_rope3d": 2, "varlen_attention": 4}  # fmt: skip
    for kernels, backend in ((True, "auto"), (False, "reference")):  # the same ops on both paths
        # attention follows attn_backend ("auto"), every other op the kernels switch
        want = {(name, "auto" if name == "varlen_attention" else backend): n for name, n in expected.items()}
        assert res[kernels][3] == want, f"kernels={kernels}"
    (o1, gx1, gp1, _), (o0, gx0, gp0, _) = res[True], res[False]
    torch.testing.assert_close(o1, o0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx1, gx0, atol=1e-4, rtol=1e-3)
    for n in gp0:
        scale = gp0[n].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(gp1[n] / scale, gp0[n] / scale, atol=2e-4, rtol=0, msg=n)
    assert all(g.abs().max() > 0 for n, g in gp0.items()), "every parameter gets a gradient"


def test_kernels_on_off_bf16():
    model = _randomize(MUGDiT(_cfg(depth=1)), seed=6).to(torch.bfloat16)
    x, t, y = _inputs(T=2, H=2, W=2, L=3, seed=4)
    outs = []
    for kernels in (True, False):
        model.kernels = kernels
        with torch.no_grad():
            outs.append(model(x, t, y, fps=torch.tensor([24.0]), x_mask=torch.tensor([[False, True]] * 2)))
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], atol=0.1, rtol=0.05)


def test_reference_backend_compiles_fullgraph():
    """``kernels=False`` compiles to one graph (aot_eager): every op is a registered op or
    the ops' reference, and attention is FlexAttention while compiling on a CPU (no host
    read of the offsets). The compiled forward equals the eager one (SDPA per clip)."""
    model = _randomize(MUGDiT(_cfg(depth=1), kernels=False), seed=7).eval()
    assert model.backend == "reference"
    x, t, y = _inputs(T=2, H=2, W=4, L=3, seed=8)
    kw = dict(x_mask=torch.tensor([[False, True], [True, True]]), fps=torch.tensor([24.0, 30.0]))
    with torch.no_grad():
        eager = model(x, t, y, **kw)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y, **kw)
    assert eager.abs().mean() > 0.1
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_kernels_switch_values():
    model = MUGDiT("tiny", kernels="triton")
    assert (model.kernels, model.backend) == ("triton", "triton")
    model.kernels = True
    assert model.backend == "auto"
    with pytest.raises(ValueError, match="kernels must be a bool or one of"):
        MUGDiT("tiny", kernels="cuda")


# ----------------------------------------------------------------------------------------
# Packed forward
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", [True, False])
def test_packed_equals_per_clip(pair, kernels):
    model = pair[0]
    model.kernels = kernels
    g = torch.Generator().manual_seed(7)
    # incl. a single image and odd sizes; few tokens on the (interpreted) kernel path
    sizes = [(3, 2, 4), (1, 2, 2), (2, 3, 2)] if kernels else [(3, 4, 6), (1, 2, 2), (2, 5, 3)]
    lat = [torch.randn(24, *s, generator=g) for s in sizes]
    caps = [torch.randn(n, TEXT_DIM, generator=g) for n in ((3, 1, 2) if kernels else (5, 1, 3))]
    t = torch.tensor([900.0, 10.0, 450.0])
    fps = torch.tensor([24.0, 8.0, 30.0])
    x_mask = [torch.tensor([False, True, True]), None, torch.tensor([True, False])]
    fi = [None, torch.tensor([0, 1, 2]), torch.tensor([2, 4, 6, 8])]
    with torch.no_grad():
        packed = model.forward_packed(lat, t, caps, fps=fps, x_mask=x_mask, frame_indice=fi)
        if not kernels:  # the same captions given packed, with their offsets
            cu = torch.tensor([0, *torch.tensor([c.shape[0] for c in caps]).cumsum(0).tolist()])
            packed2 = model.forward_packed(lat, t, torch.cat(caps), text_cu_seqlens=cu, fps=fps, x_mask=x_mask, frame_indice=fi)
        for i in range(3):
            alone = model(
                lat[i][None], t[i : i + 1], caps[i][None, None], fps=fps[i : i + 1],
                x_mask=None if x_mask[i] is None else x_mask[i][None],
                frame_indice=None if fi[i] is None else fi[i][None],
            )  # fmt: skip
            assert packed[i].shape == (48, *sizes[i])
            torch.testing.assert_close(packed[i], alone[0], atol=2e-5, rtol=2e-5)
            if not kernels:
                torch.testing.assert_close(packed2[i], packed[i], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix, pair):
    src = pair[0]
    path = tmp_path / f"dit{suffix}"
    save_checkpoint(src, path)
    dst = MUGDiT(_cfg())
    assert load_checkpoint(dst, path) == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # into a model built on the meta device: tensors are assigned, nothing is allocated twice
    with torch.device("meta"):
        meta = MUGDiT(_cfg())
    load_checkpoint(meta, path)
    assert not any(p.is_meta for p in meta.parameters())
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in src.state_dict().items())


def test_checkpoint_wrapped_pt_and_public_model(tmp_path, pair):
    ours, pub = pair
    path = tmp_path / "public.pth"
    torch.save({"state_dict": pub.state_dict(), "step": 3}, path)  # the usual training wrapper
    model = MUGDiT(_cfg())
    load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_checkpoint_mismatch_lists_all_keys(tmp_path, pair):
    sd = dict(pair[0].state_dict())
    for k in ("start_token", "blocks.1.attn.q_norm.weight", "final_layer.linear.bias"):
        del sd[k]
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(3)
    sd["pos_embed"] = torch.zeros(3)
    sd["t_block.1.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(sd, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(MUGDiT(_cfg()), path)
    err = info.value
    assert err.missing == ["blocks.1.attn.q_norm.weight", "final_layer.linear.bias", "start_token"]
    assert err.unexpected == ["blocks.2.attn.qkv.weight", "pos_embed"]
    assert [m[0] for m in err.mismatched] == ["t_block.1.bias"]
    msg = str(err)
    for k in err.missing + err.unexpected + ["t_block.1.bias"]:
        assert k in msg
    # non-strict: missing/unexpected are reported, shape mismatches still raise
    del sd["t_block.1.bias"]
    save_checkpoint(sd, path)
    missing, unexpected = load_checkpoint(MUGDiT(_cfg()), path, strict=False)
    assert "t_block.1.bias" in missing and unexpected == ["blocks.2.attn.qkv.weight", "pos_embed"]


def test_checkpoint_bad_paths(tmp_path):
    model = MUGDiT(_cfg(depth=1))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pt")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_checkpoint(model, tmp_path / "w.ckpt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_checkpoint(model, tmp_path / "list.pt")


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_inputs(pair):
    model = pair[0]
    x, t, y = _inputs(T=2, H=4, W=4)
    fps = torch.tensor([24.0])
    cases = [
        (dict(x=x[:, :16]), ValueError, "in_channels=24"),
        (dict(x=x[0]), ValueError, "5-D"),
        (dict(x=x[:, :, :0]), ValueError, "T, H, W >= 1"),
        (dict(x=x.long()), TypeError, "floating"),
        (dict(y=torch.randn(2, 1, 5, 32)), ValueError, f"text_dim={TEXT_DIM}"),
        (dict(y=y[:1]), ValueError, "batch size"),
        (dict(t=torch.rand(3)), ValueError, "timestep"),
        (dict(frame_indice=torch.arange(3)[None]), ValueError, "T \\+ 2 = 4"),
        (dict(frame_indice=torch.arange(4.0)[None]), TypeError, "integer"),
        (dict(frame_indice=torch.arange(4)[None].repeat(3, 1)), ValueError, "frame_indice has 3 rows"),
        (dict(x_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "x_mask must be \\[B, Nt\\]"),
        (dict(fps=None), ValueError, "fps is required"),
        (dict(mask=torch.ones(2, 4)), ValueError, "mask must be"),
        (dict(mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), ValueError, "at least one valid token"),
    ]
    for over, exc, pattern in cases:
        args = dict(x=x, t=t, y=y, fps=fps)
        args.update(over)
        kw = {k: v for k, v in args.items() if k not in ("x", "t", "y")}
        with pytest.raises(exc, match=pattern):
            model(args["x"], args["t"], args["y"], **kw)


def test_bad_packed_inputs(pair):
    model = pair[0]
    lat = [torch.randn(24, 2, 4, 4), torch.randn(24, 1, 2, 2)]
    caps = [torch.randn(3, TEXT_DIM), torch.randn(2, TEXT_DIM)]
    t, fps = torch.tensor([1.0, 2.0]), torch.tensor([24.0])
    with pytest.raises(TypeError, match="non-empty list"):
        model.forward_packed([], t, caps, fps=fps)
    with pytest.raises(ValueError, match=r"latents\[1\] has 8 latent channels"):
        model.forward_packed([lat[0], lat[1][:8]], t, caps, fps=fps)
    with pytest.raises(ValueError, match="one entry per clip"):
        model.forward_packed(lat, torch.rand(3), caps, fps=fps)
    with pytest.raises(ValueError, match="one entry .* per clip"):
        model.forward_packed(lat, t, caps[:1], fps=fps)
    with pytest.raises(ValueError, match=r"text\[1\] has 7 features"):
        model.forward_packed(lat, t, [caps[0], torch.randn(2, 7)], fps=fps)
    with pytest.raises(ValueError, match="needs text_cu_seqlens"):
        model.forward_packed(lat, t, torch.cat(caps), fps=fps)
    with pytest.raises(ValueError, match="non-decreasing offsets"):
        model.forward_packed(lat, t, torch.cat(caps), text_cu_seqlens=torch.tensor([0, 3, 4]), fps=fps)
    with pytest.raises(ValueError, match=r"frame_indice\[0\] must have T \+ 2 = 4"):
        model.forward_packed(lat, t, caps, fps=fps, frame_indice=[torch.arange(5), None])
    with pytest.raises(ValueError, match=r"x_mask\[1\] must have Nt = 1"):
        model.forward_packed(lat, t, caps, fps=fps, x_mask=[None, torch.ones(2)])


def test_tiny_trains_on_cpu():
    """A few optimizer steps of the tiny flavor on one fixed batch reduce the loss."""
    torch.manual_seed(0)
    model = MUGDiT("tiny", kernels=False)  # the reference path: fast on a CPU
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, t = torch.randn(2, 24, 2, 4, 4), torch.tensor([300.0, 700.0])
    y, fps = torch.randn(2, 3, 384), torch.tensor([24.0])
    target = torch.randn(2, 24, 2, 4, 4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x, t, y, fps=fps)[:, :24] - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
