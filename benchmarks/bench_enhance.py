"""The MUG-V enhancer on one GPU: one enhancement of 105 frames at 720 x 1280 (the output of the
released 5 s generation), seconds per stage and peak memory.

:class:`mugv.enhance.EnhancePipeline` at the released sizes with random weights in bf16: the
Wan2.1-1.3B-shaped DiT (:data:`mugv.models.wan.WAN_FLAVORS` ``"1.3b"``, LoRA merged: the same
cost as none), the Wan2.1 VAE (``AutoencoderKLWan`` on ``mk.causal_conv3d``, spatially tiled) and
a stand-in caption encoder (random 4096-d token states: umT5-XXL's cost is not part of this
case). One step, CFG 2.0 (cond and uncond batched): 27 latent frames x 45 x 80 patches = 97,200
tokens per sample. Records the seconds of ``encode_video``, ``denoise``, ``decode``, the total and
``torch.cuda.max_memory_allocated`` in ``benchmarks/results/enhance.jsonl``. GPU only: skips
without CUDA.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks._common import ON_GPU, record

pytestmark = pytest.mark.skipif(not ON_GPU, reason="the enhancer benchmark needs a CUDA device")

FRAMES, HEIGHT, WIDTH = 105, 720, 1280


class _RandomCaptions:
    def __call__(self, texts):
        from mugv.text import TextEmbeddings

        states = torch.randn(len(texts), 64, 4096, device="cuda", dtype=torch.bfloat16)
        return TextEmbeddings.from_padded(states, torch.ones(len(texts), 64, dtype=torch.long, device="cuda"))


@torch.no_grad()
@pytest.mark.parametrize("height,width", [(HEIGHT, WIDTH)])
def test_enhance_105_frames_720p(height, width):
    from diffusers import AutoencoderKLWan

    from mugv.enhance import EnhancePipeline
    from mugv.models.wan import WAN_FLAVORS, WanDiT
    from mugv.models.wan_vae import WAN21_VAE_CONFIG, WanVAE
    from mugv_kernels.integrations.diffusers import apply_mugv_kernels

    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = WanDiT(WAN_FLAVORS["1.3b"]).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in WAN21_VAE_CONFIG.items()})
    vae = vae.to(torch.bfloat16)
    apply_mugv_kernels(vae)
    pipe = EnhancePipeline(dit, WanVAE(vae, tiling=True), _RandomCaptions(), device="cuda")
    video = torch.randint(0, 256, (FRAMES, height, width, 3), dtype=torch.uint8)
    t0 = time.perf_counter()
    out = pipe(video, "a test caption", seed=0)
    total = time.perf_counter() - t0
    assert out.shape == (FRAMES, height, width, 3)
    record("enhance", {"case": f"enhance-{FRAMES}x{height}x{width}-1step-cfg2-bf16", "seconds_total": total,
                       **{f"seconds_{k}": v for k, v in pipe.last_timings.items()},
                       "peak_memory_gib": pipe.peak_memory_gib, "tokens_per_sample": 27 * (height // 16) * (width // 16)})
