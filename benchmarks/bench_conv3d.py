"""Video-VAE family benchmarks: causal 3D convolution and GroupNorm + SiLU.

Convolution: our Triton implicit GEMM (NCDHW and channels-last input) and the
CUDA kernel (``backend="cuda"``, channels-last, when ``mugv_kernels._C`` is built) against

* ``cudnn``: ``F.conv3d`` alone on an input already padded (cuDNN's speed, no padding
  cost), NCDHW and ``channels_last_3d``;
* ``pad+cudnn``: ``F.pad`` + ``F.conv3d``, what the public VAE runs (our target
  is >= 1.3x this pair);
* ``compile``: ``torch.compile`` of the pad + conv pair.

Shapes: the MUG-V temporal VAE at 720p (``[1, 512, 48, 90, 160] -> 128`` and the
512/256/128-channel stages) and a full-3D VAE's first stage on pixels
(``[1, 3, 17, 720, 1280] -> 128``), bf16, kernel (3, 3, 3). Figures: median time,
TFLOP/s of the useful ``2 * M * C_out * C_in * 27`` FLOPs, peak memory of one call.

Streaming: a two-conv encoder stem over a 129-frame 720p clip, one pass against chunks of
16 frames carried with their context (time and peak memory).

GroupNorm + SiLU: GB/s of the bytes that must move (forward: read x, write y; forward +
backward adds read x and dy, write dx) against ``F.silu(F.group_norm(...))`` eager and
compiled.

On CPU the suite runs tiny shapes (few rounds) so it stays exercised; no figure is
recorded there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mugv_kernels as mk
from benchmarks._common import COMPILE_BACKEND, DEVICE, ON_GPU, run, sync
from mugv.perf import causal_conv3d_cost, group_norm_silu_cost
from mugv_kernels.nn import CausalConv3d
from mugv_kernels._registry import cuda_extension

SUITE = "conv3d"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
ROUNDS = 20 if ON_GPU else 1
CL = torch.channels_last_3d

# (name, x shape [B, C_in, T, H, W], C_out)
CONV_SHAPES = (
    [
        ("temporal-512to128", (1, 512, 48, 90, 160), 128),
        ("stage-512", (1, 512, 12, 90, 160), 512),
        ("stage-256", (1, 256, 12, 180, 320), 256),
        ("stage-128", (1, 128, 12, 360, 640), 128),
        ("pixels-3to128", (1, 3, 17, 720, 1280), 128),
    ]
    if ON_GPU
    else [("tiny", (1, 4, 2, 4, 3), 8)]
)
GN_SHAPES = (
    [(1, 512, 48, 90, 160), (1, 256, 24, 180, 320), (1, 128, 12, 360, 640)] if ON_GPU else [(1, 8, 3, 6, 5)]
)


def peak_memory(fn) -> int | None:
    """Peak bytes allocated during one call, above what was allocated before (GPU)."""
    if not ON_GPU:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def pad_conv(x, w, b):
    """The public VAE's causal conv: F.pad (time causal, space zeros), then F.conv3d."""
    kT, kH, kW = w.shape[2:]
    xp = F.pad(x, (kW // 2, kW // 2, kH // 2, kH // 2, kT - 1, 0))
    return F.conv3d(xp, w, b)


compiled_pad_conv = torch.compile(pad_conv, backend=COMPILE_BACKEND)


def conv_impls(x, w, b):
    """name -> zero-argument callable, for one input."""
    kT, kH, kW = w.shape[2:]
    pre = F.pad(x, (kW // 2, kW // 2, kH // 2, kH // 2, kT - 1, 0))
    impls = {
        "mugv-triton": lambda: mk.causal_conv3d(x, w, b),
        "mugv-triton-cl": (lambda xc: lambda: mk.causal_conv3d(xc, w, b))(x.contiguous(memory_format=CL)),
        "cudnn": lambda: F.conv3d(pre, w, b),
        "cudnn-cl": (lambda pc: lambda: F.conv3d(pc, w, b))(pre.contiguous(memory_format=CL)),
        "pad+cudnn": lambda: pad_conv(x, w, b),
        "pad+cudnn-cl": (lambda xc: lambda: pad_conv(xc, w, b))(x.contiguous(memory_format=CL)),
        "compile": lambda: compiled_pad_conv(x, w, b),
    }
    if ON_GPU and cuda_extension() is not None:
        impls["mugv-cuda-cl"] = (lambda xc: lambda: mk.causal_conv3d(xc, w, b, backend="cuda"))(
            x.contiguous(memory_format=CL)
        )
    return impls


IMPL_NAMES = ["mugv-triton", "mugv-triton-cl", "mugv-cuda-cl", "cudnn", "cudnn-cl", "pad+cudnn", "pad+cudnn-cl", "compile"]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("impl", IMPL_NAMES if ON_GPU else ["mugv-triton", "pad+cudnn"])
def test_conv_forward(benchmark, impl, shape):
    name, (B, C_in, T, H, W), C_out = shape
    x = torch.randn(B, C_in, T, H, W, device=DEVICE, dtype=DTYPE)
    w = torch.randn(C_out, C_in, 3, 3, 3, device=DEVICE, dtype=DTYPE) / math.sqrt(27 * C_in)
    b = torch.randn(C_out, device=DEVICE, dtype=DTYPE)
    impls = conv_impls(x, w, b)
    if impl not in impls:
        pytest.skip(f"{impl} unavailable (mugv_kernels._C not built)")
    fn = impls[impl]
    with torch.no_grad():
        mem = peak_memory(fn)
        run(
            benchmark, fn, suite=SUITE, case=f"conv-fwd/{impl}/{name}",
            flops=2.0 * B * T * H * W * C_out * C_in * 27, rounds=ROUNDS,
            roofline=[causal_conv3d_cost("conv", B, C_in, T, H, W, C_out, phase="fwd", itemsize=DTYPE.itemsize)],
            shape=[B, C_in, T, H, W], c_out=C_out, kernel=[3, 3, 3], dtype=str(DTYPE), peak_mem_bytes=mem,
        )  # fmt: skip


@pytest.mark.parametrize("impl", ["mugv-triton", "pad+cudnn"])
def test_conv_forward_backward(benchmark, impl):
    """dx, dw, db of the 512 -> 128 temporal-VAE conv (tiny on CPU)."""
    name, (B, C_in, T, H, W), C_out = CONV_SHAPES[0]
    x = torch.randn(B, C_in, T, H, W, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(C_out, C_in, 3, 3, 3, device=DEVICE, dtype=DTYPE) / math.sqrt(27 * C_in)).requires_grad_()
    b = torch.randn(C_out, device=DEVICE, dtype=DTYPE, requires_grad=True)
    f = (lambda: mk.causal_conv3d(x, w, b)) if impl == "mugv-triton" else (lambda: pad_conv(x, w, b))
    dy = torch.randn_like(f().detach())

    def step():
        torch.autograd.grad(f(), (x, w, b), dy)

    mem = peak_memory(step)
    run(
        benchmark, step, suite=SUITE, case=f"conv-fwd+bwd/{impl}/{name}",
        flops=3 * 2.0 * B * T * H * W * C_out * C_in * 27, rounds=ROUNDS,
        roofline=[causal_conv3d_cost("conv", B, C_in, T, H, W, C_out, phase=p, itemsize=DTYPE.itemsize)
                  for p in ("fwd", "bwd")],
        shape=[B, C_in, T, H, W], c_out=C_out, dtype=str(DTYPE), peak_mem_bytes=mem,
    )  # fmt: skip


class _Stem(torch.nn.Module):
    """Two causal convs (3 -> 32 -> 16 channels, the second at half resolution)."""

    def __init__(self):
        super().__init__()
        self.conv1 = CausalConv3d(3, 32, 3)
        self.conv2 = CausalConv3d(32, 16, 3, stride=(1, 2, 2))

    def forward(self, x):
        return self.conv2(self.conv1(x))

    def chunked(self, x, chunk: int):
        c1 = c2 = None
        outs = []
        for t0 in range(0, x.shape[2], chunk):
            h, c1 = self.conv1.forward_chunk(x[:, :, t0 : t0 + chunk], c1)
            y, c2 = self.conv2.forward_chunk(h, c2)
            outs.append(y)
        return torch.cat(outs, 2)


@pytest.mark.parametrize("mode", ["one-pass", "chunked16"])
def test_streaming(benchmark, mode):
    """129-frame 720p clip (tiny on CPU): chunked with carried context vs one pass."""
    shape = (1, 3, 129, 720, 1280) if ON_GPU else (1, 3, 4, 4, 4)
    stem = _Stem().to(DEVICE, DTYPE)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    fn = (lambda: stem(x)) if mode == "one-pass" else (lambda: stem.chunked(x, 16 if ON_GPU else 2))
    with torch.no_grad():
        mem = peak_memory(fn)
        run(benchmark, fn, suite=SUITE, case=f"stream/{mode}", rounds=5 if ON_GPU else 1, shape=list(shape),
            dtype=str(DTYPE), peak_mem_bytes=mem)  # fmt: skip


def gn_eager(x, w, b):
    return F.silu(F.group_norm(x, 32 if x.shape[1] >= 32 else 2, w, b, 1e-6))


gn_compiled = torch.compile(gn_eager, backend=COMPILE_BACKEND)


@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["mugv-triton", "mugv-cuda", "eager", "compile"] if ON_GPU else ["mugv-triton", "eager"])
def test_group_norm_silu(benchmark, impl, shape, layout):
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    C = shape[1]
    G = 32 if C >= 32 else 2
    w = torch.rand(C, device=DEVICE, dtype=DTYPE) + 0.5
    b = torch.randn(C, device=DEVICE, dtype=DTYPE)
    if impl == "mugv-cuda" and cuda_extension() is None:
        pytest.skip("mugv_kernels._C not built")
    fns = {
        "mugv-triton": lambda: mk.group_norm_silu(x, G, w, b),
        "mugv-cuda": lambda: mk.group_norm_silu(x, G, w, b, backend="cuda"),
        "eager": lambda: gn_eager(x, w, b),
        "compile": lambda: gn_compiled(x, w, b),
    }
    with torch.no_grad():
        run(
            benchmark, fns[impl], suite=SUITE, case=f"gn-silu-fwd/{impl}/{layout}",
            bytes_moved=2 * x.numel() * x.element_size(), rounds=ROUNDS, shape=list(shape), dtype=str(DTYPE),
            roofline=[group_norm_silu_cost("gn", shape[0], C, x.numel() // (shape[0] * C), G, phase="fwd",
                                           itemsize=DTYPE.itemsize)],
        )  # fmt: skip


@pytest.mark.parametrize("shape", GN_SHAPES[:1], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["mugv-triton", "eager", "compile"] if ON_GPU else ["mugv-triton"])
def test_group_norm_silu_forward_backward(benchmark, impl, shape):
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    C = shape[1]
    w = (torch.rand(C, device=DEVICE, dtype=DTYPE) + 0.5).requires_grad_()
    b = torch.randn(C, device=DEVICE, dtype=DTYPE, requires_grad=True)
    G = 32 if C >= 32 else 2
    f = {"mugv-triton": lambda: mk.group_norm_silu(x, G, w, b), "eager": lambda: gn_eager(x, w, b),
         "compile": lambda: gn_compiled(x, w, b)}[impl]  # fmt: skip
    dy = torch.randn_like(x)

    def step():
        torch.autograd.grad(f(), (x, w, b), dy)

    run(
        benchmark, step, suite=SUITE, case=f"gn-silu-fwd+bwd/{impl}",
        bytes_moved=5 * x.numel() * x.element_size(), rounds=ROUNDS, shape=list(shape), dtype=str(DTYPE),
        roofline=[group_norm_silu_cost("gn", shape[0], C, x.numel() // (shape[0] * C), G, phase=p, itemsize=DTYPE.itemsize)
                  for p in ("fwd", "bwd")],
    )  # fmt: skip
