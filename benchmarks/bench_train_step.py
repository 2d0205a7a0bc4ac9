"""End-to-end DiT training step: tokens/s and MFU, fused kernels on vs off.

One optimizer step (packed forward with activation checkpointing per block, rectified-flow
loss, backward, AdamW) of

* the ``1b`` flavor (depth 56, width 1152) at the 360p and 720p token counts of MUG-V
  (360x640: 14 latent frames x 23 x 40 patches + 2 = 12,882 tokens; 720p 3 s:
  10 x 45 x 80 + 2 = 36,002 tokens), and
* a 10b-width slice (width 3456, 48 heads) of 4 blocks at 36,002 tokens,

bf16 autocast over fp32 master weights (the single-GPU analog of FSDP2's
``MixedPrecisionPolicy``), a 120-token 4096-d caption. FLOPs follow
:func:`mugv.train.logging.dit_train_flops` (6N per token + attention; the recomputation of
activation checkpointing is not counted, as MFU conventions require), MFU is against the
device's bf16 dense peak from :func:`mugv_kernels.device.device_peaks`.
:func:`test_train_step_ac_fp8` records the 10b-width slice at 36,002 tokens with each
activation-checkpointing mode (``none``, ``selective``, ``full``) and with fp8 linears
(``tensorwise``, ``rowwise``; sm_89+ only), kernels on; it skips without CUDA.
Targets (H100): kernels on >= 1.3x kernels off; 10b-width blocks at 36,002 tokens
>= 45% MFU. On CPU a tiny model runs so the suite stays exercised (no figures recorded).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import DEVICE, ON_GPU, run
from mugv.train.logging import dit_train_flops

SUITE = "train_step"
TEXT_TOKENS = 120

# (case, flavor, overrides, latent grid (T, H, W) in latent pixels)
CASES = (
    [
        ("1b-360p", "1b", {}, (14, 46, 80)),
        ("1b-720p", "1b", {}, (10, 90, 160)),
        ("10b-width-4blocks-720p", "10b", {"depth": 4}, (10, 90, 160)),
    ]
    if ON_GPU
    else [("tiny-cpu", "tiny", {"depth": 1, "text_dim": 64}, (2, 8, 8))]
)


def _setup(flavor: str, overrides: dict, grid: tuple[int, int, int], kernels: bool, ac: str | bool = ON_GPU,
           fp8: str = "none"):
    from mugv.models import DiTConfig, MUGDiT
    from mugv.train.fp8 import apply_fp8
    from mugv.train.parallelize import parallelize_dit

    text_dim = overrides.pop("text_dim", 4096)
    cfg = DiTConfig.from_flavor(flavor, text_dim=text_dim, **overrides)
    with torch.device("meta"):
        model = MUGDiT(cfg, kernels=kernels)
    apply_fp8(model, fp8)
    parallelize_dit(model, fsdp=False, activation_checkpointing=ac)
    model.to_empty(device=DEVICE)
    with torch.no_grad():
        model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ON_GPU)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = torch.randn(cfg.in_channels, *grid, device=DEVICE, generator=g)
    noise = torch.randn(x0.shape, device=DEVICE, generator=g)
    text = torch.randn(TEXT_TOKENS, text_dim, device=DEVICE, generator=g)
    t = 0.6
    x_t = (1 - t) * x0 + t * noise
    target = noise - x0
    ts = torch.tensor([t * 1000.0], device=DEVICE)
    fps = torch.tensor([24.0], device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU):
            out = model.forward_packed([x_t], ts, [text], fps=fps)[0]
        loss = (out[: cfg.in_channels].float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    pt, ph, pw = cfg.patch_size
    tokens = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw) + 2
    matmul = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "blocks" in n and "kv_linear" not in n)  # fmt: skip
    flops = dit_train_flops(matmul, cfg.depth, cfg.hidden_size, [tokens], [TEXT_TOKENS])
    return step, tokens, flops, cfg


# On CPU the fused ops would run in Triton's interpreter (minutes): the CPU run checks the
# harness with the reference path only.
KERNELS = [True, False] if ON_GPU else [False]


@pytest.mark.parametrize("kernels", KERNELS, ids=["kernels-on", "kernels-off"][: len(KERNELS)] if ON_GPU else ["kernels-off"])
@pytest.mark.parametrize("case,flavor,overrides,grid", CASES, ids=[c[0] for c in CASES])
def test_train_step(benchmark, case, flavor, overrides, grid, kernels):
    step, tokens, flops, cfg = _setup(flavor, dict(overrides), grid, kernels)
    figures = run(
        benchmark, step, suite=SUITE, case=f"{case}-{'kernels' if kernels else 'eager'}", flops=flops,
        rounds=5 if ON_GPU else 2, tokens=tokens, depth=cfg.depth, hidden=cfg.hidden_size, kernels=kernels,
        activation_checkpointing=ON_GPU, dtype="bf16-autocast" if ON_GPU else "fp32",
    )  # fmt: skip
    if figures:  # empty when timing is disabled (xdist / --benchmark-disable): exercised only
        benchmark.extra_info["tokens_per_s"] = tokens / figures["median_s"]
    if "frac_bf16_peak" in figures:
        benchmark.extra_info["mfu"] = figures["frac_bf16_peak"]
    if ON_GPU:
        torch.cuda.empty_cache()


AC_FP8 = [(ac, "none") for ac in ("none", "selective", "full")] + [("selective", "tensorwise"), ("selective", "rowwise")]


@pytest.mark.skipif(not ON_GPU, reason="the 10b-width slice at 36k tokens needs a GPU")
@pytest.mark.parametrize("ac,fp8", AC_FP8, ids=[f"ac-{a}-fp8-{f}" for a, f in AC_FP8])
def test_train_step_ac_fp8(benchmark, ac, fp8):
    if fp8 != "none" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    case, flavor, overrides, grid = "10b-width-4blocks-720p", "10b", {"depth": 4}, (10, 90, 160)
    step, tokens, flops, cfg = _setup(flavor, dict(overrides), grid, True, ac=ac, fp8=fp8)
    figures = run(
        benchmark, step, suite=SUITE, case=f"{case}-ac-{ac}-fp8-{fp8}", flops=flops, rounds=5, tokens=tokens,
        depth=cfg.depth, hidden=cfg.hidden_size, kernels=True, activation_checkpointing=ac, fp8=fp8,
        dtype="bf16-autocast",
    )  # fmt: skip
    if figures:
        benchmark.extra_info["tokens_per_s"] = tokens / figures["median_s"]
    if "frac_bf16_peak" in figures:
        benchmark.extra_info["mfu"] = figures["frac_bf16_peak"]
    torch.cuda.empty_cache()
