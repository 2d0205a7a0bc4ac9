"""The released MUG-V 10B pipeline on one GPU: a sampling step and the VAE decode, against the
same math in eager PyTorch as the public code runs it.

* **Sampling step**: one CFG step (cond and uncond batched, ``B = 2``) of a 10b-width slice
  (width 3456, 48 heads, ``DEPTH`` blocks) at 720p 5 s (14 x 160 x 90 latents: 50,402 tokens), a
  120-token 4096-d caption pair, bf16: :class:`mugv.models.MUGDiT` (fused kernels, packed
  varlen attention) with ``offload="none"`` and ``offload="blocks"`` (blocks streamed from
  pinned host memory, :class:`mugv.pipeline.BlockStreamer`), against the plain-PyTorch
  re-implementation of the public forward (``tests/stack/_mugv_public_ref.PublicMUGDiT``: double
  normalization + ``torch.where``, complex RoPE tables, SDPA) with the same weights. Target: at
  least 1.5x the public per-step time at equal output.
* **VAE decode**: the released VAE at its real widths (random weights, bf16) decoding 14 latents
  to 105 frames at 1280 x 720, ours (:class:`mugv.models.ReleasedVideoVAE`, frames in
  micro-batches of 4 and of 1, and with 512-pixel spatial tiles) against the public pipeline as
  the public code runs it (``tests/stack/_mugv_public_pipeline.PubVAEPipeline``: diffusers'
  blocks, micro-batches of 4).

Each case records the median seconds, the peak device memory (``torch.cuda.max_memory_allocated``)
and the max abs difference to the public output, in ``benchmarks/results/pipeline.jsonl``.
GPU only: the suite skips without CUDA.

Without a GPU, ``python -m benchmarks.bench_pipeline`` prints the **counted** (not measured)
working set of the same VAE decode: the model built on the ``meta`` device at the real widths in
bf16 with the fused GroupNorm+SiLU, the decode run on meta tensors (shapes only) under
:class:`mugv.profiling.LiveTensorBytes`, per spatial micro-batch and for the whole 105-frame
decode, weights not included. On meta the mid-block attention runs PyTorch's math path, which
keeps the ``HW x HW`` attention matrix (and its softmax) alive; a fused attention kernel keeps
less, and a device allocator adds caching on top.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import ON_GPU, run

pytestmark = pytest.mark.skipif(not ON_GPU, reason="the released-pipeline benchmark needs a CUDA device")

SUITE = "pipeline"
DEPTH = 4
LATENT_720P_5S = (14, 160, 90)  # 105 frames at 1280 x 720
TEXT_TOKENS = 120


def dit_step_case(width: int = 3456, heads: int = 48, depth: int = DEPTH, grid=LATENT_720P_5S,
                  text_dim: int = 4096, device: str = "cuda", dtype=torch.bfloat16):
    """``(ours(offload) -> step fn, public step fn, compare fn)`` for one CFG step."""
    from mugv.models import MUGDiT
    from mugv.models.released import load_released_dit
    from mugv.pipeline import BlockStreamer
    from tests.stack._mugv_public_ref import PublicMUGDiT

    torch.manual_seed(0)
    with torch.device(device):
        ref = PublicMUGDiT(hidden_size=width, depth=depth, num_heads=heads, text_dim=text_dim).to(dtype).eval()
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(1, 24, *grid, generator=g, device=device)
    y = torch.randn(2, 1, TEXT_TOKENS, text_dim, generator=g, device=device)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long, device=device)
    mask[1, TEXT_TOKENS // 2:] = 0
    t = torch.full((2,), 937.5, device=device)
    fps = torch.tensor([30.0], device=device, dtype=dtype)
    x_mask = torch.ones(2, grid[0], dtype=torch.bool, device=device)
    x_mask[:, 0] = False  # I2V: the reference latent
    fi = torch.arange(grid[0] + 2, device=device)[None].repeat(2, 1)
    dt = 0.04

    def public_step():
        pred = ref(torch.cat([z, z]), t, y, mask, x_mask, fps, fi).chunk(2, dim=1)[0]
        c, u = pred.chunk(2)
        return z + (u + 4.0 * (c - u)) * dt

    def ours(offload: str):
        model: MUGDiT = load_released_dit(dict(sd), device="cpu" if offload == "blocks" else device, dtype=dtype,
                                          kernels=True)
        if offload == "blocks":
            for name, child in model.named_children():
                if name != "blocks":
                    child.to(device)
            BlockStreamer(model.blocks, device)

        def step():
            pred = model(torch.cat([z, z]), t, y, mask=mask, x_mask=x_mask, fps=fps)[:, :24]
            c, u = pred.float().chunk(2)
            return z + (u + 4.0 * (c - u)) * dt

        return step

    return ours, public_step


def vae_decode_case(grid=LATENT_720P_5S, device: str = "cuda", dtype=torch.bfloat16, **widths):
    """``(ours(frame_batch) -> decode fn, public decode fn)`` for the released VAE."""
    from mugv.models.vae_released import ReleasedVideoVAE
    from tests.stack._mugv_public_pipeline import PubVAEPipeline

    torch.manual_seed(0)
    ref = PubVAEPipeline(**widths).eval()
    sd = ref.state_dict()
    ref = ref.to(device, dtype)
    frames = 8 * grid[0] - 7
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(1, 24, *grid, generator=g, device=device, dtype=dtype)

    def ours(frame_batch: int, tile: int | None = None):
        vae = ReleasedVideoVAE._from_state_dict_shapes(sd, "bench", frame_batch=frame_batch, kernels=True,
                                                       tile_size=tile)
        vae.load_state_dict(sd, strict=True)
        vae = vae.to(device, dtype).eval()
        return lambda: vae.decode(z, num_frames=frames)

    return ours, lambda: ref.decode(z, num_frames=frames)


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


@torch.no_grad()
@pytest.mark.parametrize("impl", ["public-eager", "ours-none", "ours-blocks"])
def test_sampling_step_10b_width_720p_5s(benchmark, impl):
    ours, public = dit_step_case()
    fn = public if impl == "public-eager" else ours(impl.split("-")[1])
    out, peak = _peak(fn)
    want, _ = _peak(public) if impl != "public-eager" else (out, peak)
    tokens = LATENT_720P_5S[0] * (LATENT_720P_5S[1] // 2) * (LATENT_720P_5S[2] // 2) + 2
    run(benchmark, fn, suite=SUITE, case=f"dit-step-10b-width-{DEPTH}blocks-720p-5s-cfg-{impl}", rounds=5,
        tokens_per_sample=tokens, batch=2, depth=DEPTH, width=3456, dtype="bf16", peak_memory_bytes=peak,
        max_abs_diff_vs_public=float((out.float() - want.float()).abs().max()))
    torch.cuda.empty_cache()


@torch.no_grad()
@pytest.mark.parametrize("impl", ["public-eager", "ours-frame-batch-4", "ours-frame-batch-1",
                                  "ours-frame-batch-4-tile-512"])
def test_vae_decode_105_frames_720p(benchmark, impl):
    ours, public = vae_decode_case()
    parts = impl.split("-")
    fn = public if impl == "public-eager" else ours(int(parts[3]), int(parts[5]) if len(parts) > 4 else None)
    out, peak = _peak(fn)
    want = out if impl == "public-eager" else _peak(public)[0]
    run(benchmark, fn, suite=SUITE, case=f"vae-decode-105x1280x720-{impl}", rounds=3, frames=105, height=1280,
        width=720, dtype="bf16", peak_memory_bytes=peak,
        max_abs_diff_vs_public=float((out.float() - want.float()).abs().max()))
    torch.cuda.empty_cache()


def counted_decode_working_set(frame_batch: int | None = 4, tile: int | None = None, grid=LATENT_720P_5S,
                               dtype=torch.bfloat16) -> tuple[int, int]:
    """Counted bytes (see the module docstring) of the released VAE decode of ``grid`` latents:
    ``(one spatial micro-batch of frame_batch frames, the whole decode)``, with ``tile``-pixel
    spatial tiles or whole frames (``None``)."""
    from mugv.models import VideoVAE
    from mugv.profiling import LiveTensorBytes

    with torch.device("meta"):
        vae = VideoVAE.from_preset("mugv-released", kernels=True, frame_batch=frame_batch).to(dtype).eval()
    vae.set_tiling(tile)
    frames = 8 * grid[0] - 7
    with torch.no_grad():
        feats = torch.empty(1, vae.spatial_vae.feature_channels, frame_batch or frames, *grid[1:], device="meta",
                            dtype=dtype)
        with LiveTensorBytes() as micro:
            vae.spatial_vae.decode(feats)
        z = torch.empty(1, vae.out_channels, *grid, device="meta", dtype=dtype)
        with LiveTensorBytes() as whole:
            vae.decode(z, num_frames=frames)
    return micro.peak, whole.peak


def main() -> None:
    """Print the counted working sets as a Markdown table (GiB)."""
    print("| 105 frames at 1280 x 720, bf16 | one spatial micro-batch (counted) | whole decode (counted) |")
    print("| --- | --- | --- |")
    for fb in (4, 1):
        for tile in (None, 512, 256):
            micro, whole = counted_decode_working_set(fb, tile)
            what = "whole frames" if tile is None else f"{tile}-px tiles"
            print(f"| micro-batches of {fb}, {what} | {micro / 2**30:.2f} GiB | {whole / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
