"""QK-RMSNorm + 3D RoPE benchmarks: :func:`mugv_kernels.qk_norm_rope3d` against the public
MUG-V formulation in eager PyTorch and ``torch.compile`` of our reference, forward and
forward+backward.

GPU shapes: MUG-V 10B self-attention, q and k ``[1, N, 48, 72]`` bf16 at
N = 36002 / 50402 tokens (3 s / 5 s at 720p: 10 / 14 latent frames of 45 x 80 patches
plus start/end tokens), taken as slices of a fused ``[1, N, 3, 48, 72]`` qkv projection
as the model does, positions from :func:`mugv_kernels.video_positions`, learned norm
weights. On CPU the suite runs a tiny shape through the interpreter so it stays exercised.

Baselines:
- ``eager``: the public code (``mug_v/dit/module.py``): ``RMSNorm`` (fp32 statistics,
  normalized values cast back to bf16, times the weight) then ``apply_rotary_emb``
  (fp32 ``view_as_complex`` times a precomputed complex64 ``[1, N, 1, 36]`` table, cast
  back). The table is built once outside the timed region, as the model builds it once
  per forward for all 56 blocks.
- ``compile``: ``torch.compile`` of :func:`mugv_kernels.reference.rope.qk_norm_rope3d_ref`
  for q and k (angles from the integer positions, like our kernel).

Bytes that must move (elements of ``[N, H, D]``, bf16 = 2 B): forward reads q, k and
writes q_out, k_out (4 N H D); backward reads dq_out, dk_out, q, k and writes dq, dk
(6 N H D). Positions (12 B per token) and weights are negligible and not counted.
"""

from __future__ import annotations

import pytest
import torch

import mugv_kernels as mk
from benchmarks._common import COMPILE_BACKEND, DEVICE, ON_GPU, run
from mugv.perf import qk_norm_rope_cost
from mugv_kernels.reference.rope import qk_norm_rope3d_ref

SUITE = "rope"
DTYPE = torch.bfloat16
SECTIONS = (24, 24, 24)
HEADS, HEAD_DIM = (48, 72) if ON_GPU else (2, 72)
# (T, H, W) latent grids: N = T*H*W + 2
GRIDS = [(10, 45, 80), (14, 45, 80)] if ON_GPU else [(1, 2, 3)]


def public_table(positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Complex64 ``[1, N, 1, D/2]`` table as ``precompute_freqs_cis_for_3drope`` +
    ``get_freq_cis`` build it (three sections over (h, w, t), same frequencies)."""
    freqs = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 6, device=positions.device)[: HEAD_DIM // 6].float() / HEAD_DIM))
    ang = positions.float()[..., None] * freqs  # [N, 3, D/6]
    return torch.polar(torch.ones_like(ang), ang).flatten(-2)[None, :, None, :]


def eager_public(q, k, positions, table, q_weight, k_weight):
    def rms_norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def rotate(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * table).flatten(3).type_as(x)

    return rotate(rms_norm(q, q_weight)), rotate(rms_norm(k, k_weight))


def _reference(q, k, positions, table, q_weight, k_weight):
    return (
        qk_norm_rope3d_ref(q, positions, SECTIONS, q_weight),
        qk_norm_rope3d_ref(k, positions, SECTIONS, k_weight),
    )


compiled_reference = torch.compile(_reference, backend=COMPILE_BACKEND)


def fused(q, k, positions, table, q_weight, k_weight):
    return mk.qk_norm_rope3d(q, k, positions, SECTIONS, q_weight=q_weight, k_weight=k_weight)


IMPLS = {"mugv": fused, "eager": eager_public, "compile": compiled_reference}


def _inputs(grid, requires_grad):
    """q, k: strided slices of a fused qkv projection (leaves when ``requires_grad``)."""
    positions = mk.video_positions(*grid, device=DEVICE)
    N = positions.shape[0]
    qkv = torch.randn(1, N, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    q, k = qkv[:, :, 0].requires_grad_(requires_grad), qkv[:, :, 1].requires_grad_(requires_grad)
    qw, kw = (1 + 0.1 * torch.randn(2, HEAD_DIM, device=DEVICE, dtype=DTYPE)).unbind(0)
    qw, kw = qw.clone().requires_grad_(requires_grad), kw.clone().requires_grad_(requires_grad)
    return q, k, positions, public_table(positions), qw, kw


def _elements(grid):
    return (grid[0] * grid[1] * grid[2] + 2) * HEADS * HEAD_DIM


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"N{g[0] * g[1] * g[2] + 2}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, grid):
    args = _inputs(grid, requires_grad=False)
    fn = IMPLS[impl]
    with torch.no_grad():
        run(
            benchmark,
            lambda: fn(*args),
            suite=SUITE,
            case=f"fwd/{impl}",
            bytes_moved=4 * _elements(grid) * DTYPE.itemsize,
            roofline=[qk_norm_rope_cost("rope", _elements(grid) // (HEADS * HEAD_DIM), HEADS, HEAD_DIM, phase="fwd")],
            shape=[1, _elements(grid) // (HEADS * HEAD_DIM), HEADS, HEAD_DIM],
            dtype=str(DTYPE),
        )


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"N{g[0] * g[1] * g[2] + 2}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, grid):
    args = _inputs(grid, requires_grad=True)
    fn = IMPLS[impl]
    q, k, _, _, qw, kw = args
    dq, dk = torch.randn(q.shape, device=DEVICE, dtype=DTYPE), torch.randn(k.shape, device=DEVICE, dtype=DTYPE)

    def step():
        q_out, k_out = fn(*args)
        torch.autograd.grad((q_out, k_out), (q, k, qw, kw), (dq, dk))

    run(
        benchmark,
        step,
        suite=SUITE,
        case=f"fwd+bwd/{impl}",
        bytes_moved=(4 + 6) * _elements(grid) * DTYPE.itemsize,
        roofline=[qk_norm_rope_cost("rope", _elements(grid) // (HEADS * HEAD_DIM), HEADS, HEAD_DIM, phase=p)
                  for p in ("fwd", "bwd")],
        shape=[1, _elements(grid) // (HEADS * HEAD_DIM), HEADS, HEAD_DIM],
        dtype=str(DTYPE),
    )
