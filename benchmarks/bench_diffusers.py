"""diffusers video transformer blocks: stock vs stock under ``torch.compile`` vs patched
with :func:`mugv_kernels.integrations.diffusers.apply_mugv_kernels`.

* Wan2.1-14B block (``WanTransformerBlock``: dim 5120, 40 heads x 128, FFN 13824,
  cross-attention norm) at 720p, 81 frames: 21 latent frames x 45 x 80 patches = 75,600
  tokens, a 512-token caption;
* HunyuanVideo dual-stream and single-stream blocks (dim 3072, 24 heads x 128, MLP ratio
  4) at 720p, 129 frames: 33 x 45 x 80 = 118,800 video tokens, a 256-token caption.

bf16 weights and activations, batch 1, forward (no grad) and forward + backward (a random
output gradient). Each case records the median time, tokens/s (video tokens) and the peak
memory allocated during one call. Target: patched >= 1.25x stock compiled for forward +
backward. GPU only (the blocks are far too large for the interpreter); no figure is
written down anywhere until measured.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks._common import ON_GPU, run

pytestmark = pytest.mark.skipif(not ON_GPU, reason="GPU benchmark (720p diffusers blocks)")

SUITE = "diffusers"
DTYPE = torch.bfloat16
WAN_GRID = (21, 90, 160)  # latent (frames, height, width), patch (1, 2, 2) -> 75,600 tokens
HV_GRID = (33, 90, 160)  # -> 118,800 tokens
WAN_TEXT, HV_TEXT = 512, 256


def _wan():
    from diffusers import WanTransformer3DModel

    with torch.device("cuda"):
        model = WanTransformer3DModel(
            num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=1, text_dim=4096
        ).to(DTYPE)
    F, H, W = WAN_GRID
    latent = torch.empty(1, 16, F, H, W, device="cuda", dtype=DTYPE)
    C = 5120
    N = F * (H // 2) * (W // 2)
    x = torch.randn(1, N, C, device="cuda", dtype=DTYPE)
    ctx = torch.randn(1, WAN_TEXT, C, device="cuda", dtype=DTYPE)
    temb = torch.randn(1, 6, C, device="cuda", dtype=DTYPE)

    def args(patched_model):
        return (x, ctx, temb, patched_model.rope(latent))

    return model, (lambda m: m.blocks[0]), args, N


def _hunyuan(single: bool):
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("cuda"):
        model = HunyuanVideoTransformer3DModel(num_layers=int(not single), num_single_layers=int(single)).to(DTYPE)
    F, H, W = HV_GRID
    latent = torch.empty(1, 16, F, H, W, device="cuda", dtype=DTYPE)
    C = 3072
    N = F * (H // 2) * (W // 2)
    x = torch.randn(1, N, C, device="cuda", dtype=DTYPE)
    ctx = torch.randn(1, HV_TEXT, C, device="cuda", dtype=DTYPE)
    temb = torch.randn(1, C, device="cuda", dtype=DTYPE)
    mask = torch.ones(1, 1, 1, N + HV_TEXT, device="cuda", dtype=torch.bool)

    def args(patched_model):
        return (x, ctx, temb, mask, patched_model.rope(latent))

    block = (lambda m: m.single_transformer_blocks[0]) if single else (lambda m: m.transformer_blocks[0])
    return model, block, args, N


MODELS = {"wan2.1-14b-720p": lambda: _wan(), "hunyuan-dual-720p": lambda: _hunyuan(False),
          "hunyuan-single-720p": lambda: _hunyuan(True)}  # fmt: skip


@pytest.mark.parametrize("impl", ["stock", "stock-compiled", "patched"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(MODELS))
def test_diffusers_block(benchmark, name, mode, impl):
    from mugv_kernels.integrations.diffusers import apply_mugv_kernels

    model, get_block, make_args, tokens = MODELS[name]()
    if impl == "patched":
        model = copy.deepcopy(model)
        apply_mugv_kernels(model)
    block = get_block(model)
    if impl == "stock-compiled":
        block = torch.compile(block)
    args = make_args(model)
    grad = mode == "fwd+bwd"
    x = args[0].detach().requires_grad_(grad)
    args = (x, *args[1:])
    dy = None

    def step():
        nonlocal dy
        with torch.set_grad_enabled(grad):
            out = block(*args)
            out = out[0] if isinstance(out, tuple) else out
            if grad:
                if dy is None:
                    dy = torch.randn_like(out)
                out.backward(dy)

    step()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    run(
        benchmark, step, suite=SUITE, case=f"{name}-{mode}-{impl}", rounds=5, per_call={"tokens": tokens},
        tokens=tokens, mode=mode, impl=impl, dtype="bf16", peak_mem_GiB=peak,
    )  # fmt: skip
    del model, block, args
    torch.cuda.empty_cache()
