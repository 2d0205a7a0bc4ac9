"""``mugv_kernels.integrations.diffusers`` against the stock diffusers models.

Tiny random configs of every supported class are built from the installed diffusers; a
deep copy is patched and both run on the same inputs: outputs and every parameter
gradient must agree in fp32 (``tests.helpers`` tolerances), with the kernels running
under Triton's interpreter. Padded captions are checked against the stock model run on
each sample alone with its caption cut to its length (Wan, which attends to padding
unless told the lengths) or against the stock masked attention (HunyuanVideo). Then the
report / remove round trip, unsupported models and versions, ``torch.compile`` of a
patched block and peft LoRA adapters. Shapes are tiny: the interpreter runs each program
in Python.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.helpers import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.hooks")

from diffusers import AutoencoderKLWan, HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

from mugv_kernels.integrations import diffusers as mkd  # noqa: E402
from mugv_kernels.integrations.diffusers import apply_mugv_kernels, remove_mugv_kernels  # noqa: E402


def tiny_wan(**overrides) -> WanTransformer3DModel:
    # head_dim 16: Wan's sections (8, 4, 4), uneven like (44, 42, 42) at 128
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=16,
    )  # fmt: skip
    cfg.update(overrides)
    return WanTransformer3DModel(**cfg).eval()


def tiny_hunyuan(**overrides) -> HunyuanVideoTransformer3DModel:
    cfg = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    cfg.update(overrides)
    return HunyuanVideoTransformer3DModel(**cfg).eval()


def patched_copy(model, **kwargs):
    other = copy.deepcopy(model)
    report = apply_mugv_kernels(other, **kwargs)
    return other, report


def assert_grads_match(stock, patched, scale: float = 1.0):
    n = 0
    for (name, p), (name2, q) in zip(stock.named_parameters(), patched.named_parameters(), strict=True):
        assert name == name2
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        assert q.grad is not None, f"{name}: no gradient in the patched model"
        assert_close(q.grad, p.grad, scale=scale)
        n += 1
    assert n > 0


# ----------------------------------------------------------------------------------------
# Wan
# ----------------------------------------------------------------------------------------


def test_wan_t2v_per_token_timesteps_padded_captions():
    """Wan 2.2-style per-token timesteps (first latent frame at t=0, as TI2V) and captions
    of different lengths given as encoder_attention_mask, against the stock model on each
    sample alone with its caption cut to its length."""
    stock = tiny_wan()
    patched, _ = patched_copy(stock)
    B, F_, H, W, L = 2, 2, 4, 4, 7
    x = torch.randn(B, 4, F_, H, W)
    N = F_ * (H // 2) * (W // 2)
    ts = torch.tensor([[0.0] * 4 + [600.0] * 4, [0.0] * 4 + [250.0] * 4])
    text = torch.randn(B, L, 16)
    lengths = [7, 3]
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    g = torch.randn(B, 4, F_, H, W)
    out = patched(x, ts, text, encoder_attention_mask=mask.long()).sample
    (out * g).sum().backward()
    for b in range(B):
        ref = stock(x[b : b + 1], ts[b : b + 1], text[b : b + 1, : lengths[b]]).sample
        assert_close(out[b : b + 1], ref)
        (ref * g[b : b + 1]).sum().backward()
    assert_grads_match(stock, patched)
    assert ts.shape == (B, N)


def test_wan_i2v_matches_stock():
    """Wan 2.1 I2V: image embeddings through add_k_proj/add_v_proj (the caption is the
    last 512 context tokens, as diffusers hard-codes), one timestep per sample."""
    stock = tiny_wan(image_dim=8, added_kv_proj_dim=32)
    patched, report = patched_copy(stock)
    assert "blocks.0.attn2.norm_added_k" in report.replaced
    x = torch.randn(1, 4, 2, 4, 2)
    ts = torch.tensor([20.0])
    text = torch.randn(1, mkd.WAN_TEXT_LEN, 16)
    img = torch.randn(1, 3, 8)
    g = torch.randn(1, 4, 2, 4, 2)
    ref = stock(x, ts, text, encoder_hidden_states_image=img).sample
    out = patched(x, ts, text, encoder_hidden_states_image=img).sample
    assert_close(out, ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert_grads_match(stock, patched)


def test_wan_partial_flags_forward():
    """norms=False keeps diffusers' block and model forwards (positions still reach attn1
    through the patched rotary module); attention=False with rope=True uses diffusers'
    dispatch_attention_fn after the fused QK norm + RoPE."""
    stock = tiny_wan()
    x, ts, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = stock(x, ts, text).sample
        for flags in (dict(norms=False), dict(attention=False), dict(rope=False)):
            patched, report = patched_copy(stock, **flags)
            assert_close(patched(x, ts, text).sample, ref)
            if not flags.get("norms", True):
                assert "" in report.left_alone and "blocks.0" in report.left_alone


# ----------------------------------------------------------------------------------------
# HunyuanVideo
# ----------------------------------------------------------------------------------------


def hunyuan_inputs(B=2, lengths=(6, 3), L=6):
    x = torch.randn(B, 4, 2, 4, 4)
    ts = torch.tensor([900, 100][:B])
    text = torch.randn(B, L, 16)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    pooled = torch.randn(B, 8)
    guidance = torch.full((B,), 4000.0)
    return x, ts, text, mask, pooled, guidance


@pytest.mark.parametrize("image_condition_type", [None, "token_replace"], ids=["t2v", "i2v-token-replace"])
def test_hunyuan_matches_stock_padded_captions(image_condition_type):
    """Dual- and single-stream blocks, captions of lengths 6 and 3 (padded to 6): the
    patched model drops the padding from the joint attention, the stock one masks it;
    the video output and every parameter gradient agree. I2V (token_replace): the
    first-frame tokens' t=0 modulation goes through the index form."""
    stock = tiny_hunyuan(image_condition_type=image_condition_type)
    patched, report = patched_copy(stock)
    assert report.replaced["transformer_blocks.0.attn"].startswith("MugvHunyuanVideoAttnProcessor")
    assert "refiner" in report.left_alone["context_embedder.token_refiner.refiner_blocks.0.attn"]
    x, ts, text, mask, pooled, guidance = hunyuan_inputs()
    g = torch.randn_like(x)
    ref = stock(x, ts, text, mask, pooled, guidance).sample
    out = patched(x, ts, text, mask, pooled, guidance).sample
    assert_close(out, ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    assert_grads_match(stock, patched)


def test_hunyuan_partial_flags_forward():
    """rope=False: diffusers' norms and apply_rotary_emb inside our processor (varlen
    attention); attention=False: fused QK norm + RoPE, then diffusers' masked attention;
    norms=False: diffusers' block forwards."""
    stock = tiny_hunyuan()
    x, ts, text, mask, pooled, guidance = hunyuan_inputs(B=1, lengths=(3,))
    with torch.no_grad():
        ref = stock(x, ts, text, mask, pooled, guidance).sample
        for flags in (dict(rope=False), dict(attention=False), dict(norms=False)):
            patched, _ = patched_copy(stock, **flags)
            assert_close(patched(x, ts, text, mask, pooled, guidance).sample, ref)


# ----------------------------------------------------------------------------------------
# Wan VAE
# ----------------------------------------------------------------------------------------


def tiny_wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]
    ).eval()


def test_wan_vae_matches_stock():
    """AutoencoderKLWan encode (first frame, then a 4-frame chunk: the frame cache is the
    conv context; the temporal downsampling conv has no time padding) and decode (frame
    by frame, temporal upsampling), output and every gradient against the stock VAE.
    The whole VAE runs the conv op's PyTorch reference path (fast); the Triton kernels
    are checked per conv kind below."""
    stock = tiny_wan_vae()
    patched, report = patched_copy(stock, backend="reference")
    convs = [n for n, m in stock.named_modules() if isinstance(m, mkd.WanCausalConv3d)]
    assert convs and all(report.replaced[n].startswith("causal_conv3d") for n in convs)
    assert any("no time padding" in report.replaced[n] for n in convs)
    x = torch.randn(1, 3, 5, 8, 8)
    outs = []
    for vae in (stock, patched):
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        outs.append((z, y))
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert_close(outs[1][0], outs[0][0])
    assert_close(outs[1][1], outs[0][1])
    assert_grads_match(stock, patched, scale=5.0)


@pytest.mark.parametrize(
    "kind,cache_frames",
    [("3x3x3", 1), ("time_conv_valid_stride2", 0), ("1x1x1", 2)],
)
def test_wan_causal_conv_kernels(kind, cache_frames):
    """One WanCausalConv3d of each kind through the Triton kernels (interpreter) with a
    cache of 1 or 2 previous frames (1: the rest of the causal padding is zeros), against
    the stock module: output, input, cache and weight gradients."""
    c = 2
    if kind == "3x3x3":
        stock = mkd.WanCausalConv3d(c, 3, 3, padding=1)
    elif kind == "1x1x1":
        stock = mkd.WanCausalConv3d(c, 3, 1)
    else:
        stock = mkd.WanCausalConv3d(c, 3, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
    vae = tiny_wan_vae()
    vae.post_quant_conv = stock  # hook it through the VAE planner
    patched_vae, _ = patched_copy(vae)
    patched = patched_vae.post_quant_conv
    x = torch.randn(1, c, 5, 3, 4, requires_grad=True)
    cache = torch.randn(1, c, cache_frames, 3, 4, requires_grad=True) if cache_frames else None
    args = (x,) if cache is None else (x, cache)
    ref, out = stock(*args), patched(*args)
    assert_close(out, ref)
    g = torch.randn_like(ref)
    extra = [cache] if cache is not None else []
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, stock.weight, stock.bias] + extra, allow_unused=True)
    grads = torch.autograd.grad((out * g).sum(), [x, patched.weight, patched.bias] + extra, allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            assert_close(a, b)


# ----------------------------------------------------------------------------------------
# Report, round trip, errors
# ----------------------------------------------------------------------------------------


def test_report_and_remove_round_trip():
    stock = tiny_wan()
    model = copy.deepcopy(stock)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    procs = {k: type(v) for k, v in model.attn_processors.items()}
    x, ts, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = model(x, ts, text).sample
    report = apply_mugv_kernels(model)
    names = {n for n, _ in model.named_modules()}
    assert set(report.replaced) | set(report.left_alone) == names
    assert not set(report.replaced) & set(report.left_alone)
    assert "blocks.0" in report.replaced and "blocks.0.attn1" in report.replaced and "rope" in report.replaced
    assert "no mugv op" in report.left_alone["patch_embedding"]
    assert "replaced" in str(report)
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="already patched"):
        apply_mugv_kernels(model)
    remove_mugv_kernels(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: type(v) for k, v in model.attn_processors.items()} == procs
    assert all("forward" not in vars(m) and not hasattr(m, "_diffusers_hook") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, ts, text).sample, ref)
    with pytest.raises(ValueError, match="not patched"):
        remove_mugv_kernels(model)
    apply_mugv_kernels(model)  # a removed model patches again
    remove_mugv_kernels(model)


def test_unsupported_models_raise(monkeypatch):
    class MyWan(WanTransformer3DModel):
        pass

    with pytest.raises(TypeError, match="exact classes"):
        apply_mugv_kernels(torch.nn.Linear(2, 2))
    sub = MyWan(num_attention_heads=1, attention_head_dim=12, in_channels=2, out_channels=2, text_dim=4,
                freq_dim=4, ffn_dim=4, num_layers=1)  # fmt: skip
    with pytest.raises(TypeError, match="MyWan"):
        apply_mugv_kernels(sub)
    model = tiny_wan()
    with pytest.raises(TypeError, match="bool"):
        apply_mugv_kernels(model, rope=1)
    with pytest.raises(ValueError, match="backend"):
        apply_mugv_kernels(model, backend="cudnn")
    from diffusers.hooks import HookRegistry, ModelHook

    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "other")
    with pytest.raises(ValueError, match="diffusers hooks"):
        apply_mugv_kernels(model)
    assert not hasattr(model, "_mugv_kernels") and "forward" not in vars(model.rope)  # nothing changed
    monkeypatch.setattr(diffusers, "__version__", "0.43.0.dev0")
    with pytest.raises(RuntimeError, match="0.42"):
        apply_mugv_kernels(tiny_wan())


def test_bad_caption_mask_raises():
    model, _ = patched_copy(tiny_wan())
    x, ts, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="prefix"):
        model(x, ts, text, encoder_attention_mask=torch.tensor([[1, 0, 1, 1, 0]]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[B, L\]"):
        model(x, ts, text, encoder_attention_mask=torch.ones(1, 4))


def test_offsets_helpers():
    cu_q, cu_k = mkd.cross_attention_offsets(4, 5, 2, torch.tensor([5, 2]))
    assert cu_q.tolist() == [0, 4, 4, 8, 8] and cu_k.tolist() == [0, 5, 5, 7, 10]
    cu_q, cu_k = mkd.joint_attention_offsets(6, torch.tensor([6, 4]))
    assert cu_q.tolist() == [0, 6, 6, 6, 10, 12, 12] and cu_k.tolist() == [0, 6, 6, 6, 10, 10, 12]
    assert mkd.wan_rope_sections(128) == (44, 42, 42)
    with pytest.raises(ValueError):
        mkd.wan_rope_sections(15)


# ----------------------------------------------------------------------------------------
# Training: torch.compile, peft LoRA
# ----------------------------------------------------------------------------------------


def test_compile_patched_block_fullgraph():
    """A patched Wan block under torch.compile(fullgraph=True) (aot_eager; the Triton
    varlen backend, which has no host sync) equals the eager patched block, forward and
    backward."""
    model, _ = patched_copy(tiny_wan(), backend="triton")
    block = model.blocks[0]
    B, N, C = 1, 8, 32
    x = torch.randn(B, N, C, requires_grad=True)
    ctx = torch.randn(B, 5, C)
    temb = torch.randn(B, 6, C)
    pos = mkd.wan_video_positions(2, 2, 2)
    lengths = torch.tensor([3], dtype=torch.int32)
    eager = block(x, ctx, temb, pos, None, lengths)
    (gx,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, ctx, temb, pos, None, lengths)
    (cgx,) = torch.autograd.grad(out.sum(), x)
    assert_close(out, eager)
    assert_close(cgx, gx)


def test_peft_lora_on_patched_model():
    """LoRA adapters (peft, through diffusers' add_adapter) on the projections: the
    patched model's output and LoRA gradients equal the stock model's; adapters added
    after patching work too."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    stock = tiny_wan()
    stock.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    patched, _ = patched_copy(stock)
    x, ts, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    ref, out = stock(x, ts, text).sample, patched(x, ts, text).sample
    assert_close(out, ref)
    ref.square().sum().backward()
    out.square().sum().backward()
    lora = [(n, p) for n, p in patched.named_parameters() if "lora" in n]
    assert lora
    stock_params = dict(stock.named_parameters())
    for n, p in lora:
        assert_close(p.grad, stock_params[n].grad)
    late = tiny_wan()
    apply_mugv_kernels(late)
    late.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    with torch.no_grad():
        late(x, ts, text)


def test_gradient_checkpointing_on_patched_model():
    """diffusers' gradient checkpointing goes through the patched model forward
    (``_gradient_checkpointing_func`` per block): same output and gradients."""
    stock = tiny_wan()
    plain, _ = patched_copy(stock)
    ckpt, _ = patched_copy(stock)
    ckpt.enable_gradient_checkpointing()
    x, ts, text = torch.randn(1, 4, 2, 2, 4), torch.tensor([300.0]), torch.randn(1, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    outs = [m(x, ts, text, encoder_attention_mask=mask).sample for m in (plain, ckpt)]
    assert_close(outs[1], outs[0])
    for o in outs:
        o.square().sum().backward()
    assert_grads_match(plain, ckpt)
