"""adaLN family benchmarks: the fused sub-layer boundary
``r = residual + gate * y; out = LayerNorm(r) * (1 + scale) + shift`` against PyTorch
eager and ``torch.compile`` of the same math, forward and forward+backward.

GPU shapes: MUG-V 10B width 3456 at 36002 / 50402 tokens (3 s / 5 s at 720p)
and the 1B width 1152, bf16, one modulation set (T2V) and two sets selected per token
(I2V). On CPU the suite runs a tiny shape through the interpreter so it stays exercised.

Bytes that must move (bf16 = 2 B): forward reads residual and y and writes r and out
(4 N C elements); backward reads dout, dr, y and r and writes dresidual and dy
(6 N C); the [B, G, C] modulation and per-row statistics are negligible.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mugv_kernels as mk
from benchmarks._common import COMPILE_BACKEND, DEVICE, ON_GPU, run
from mugv.perf import norm_cost

SUITE = "ada_norm"
DTYPE = torch.bfloat16
SHAPES = [(1, 36002, 3456), (1, 50402, 3456), (1, 36002, 1152)] if ON_GPU else [(1, 33, 288)]


def eager_chain(res, y, gate, shift, scale, index):
    """The public MUG-V formulation (separate PyTorch kernels; I2V via two selections)."""
    if index is None:
        r = res + gate[:, None] * y
        h = F.layer_norm(r, r.shape[-1:], eps=1e-6)
        return r, h * (1 + scale[:, None]) + shift[:, None]
    b = torch.arange(res.shape[0], device=res.device)[:, None]
    r = res + gate[b, index] * y
    h = F.layer_norm(r, r.shape[-1:], eps=1e-6)
    return r, h * (1 + scale[b, index]) + shift[b, index]


compiled_chain = torch.compile(eager_chain, backend=COMPILE_BACKEND)


def fused_chain(res, y, gate, shift, scale, index):
    return mk.gated_residual_ada_layer_norm(res, y, gate, shift, scale, index=index)


IMPLS = {"mugv": fused_chain, "eager": eager_chain, "compile": compiled_chain}


def _inputs(B, N, C, G, requires_grad):
    def t(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)

    mod = (B, G, C) if G > 1 else (B, C)
    index = (torch.rand(B, N, device=DEVICE) < 0.1).long() if G > 1 else None
    return t(B, N, C), t(B, N, C), t(*mod), t(*mod), t(*mod), index


@pytest.mark.parametrize("G", [1, 2], ids=["t2v", "i2v"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, shape, G):
    B, N, C = shape
    args = _inputs(B, N, C, G, requires_grad=False)
    fn = IMPLS[impl]
    with torch.no_grad():
        run(
            benchmark,
            lambda: fn(*args),
            suite=SUITE,
            case=f"fwd/{impl}/G{G}",
            bytes_moved=4 * B * N * C * DTYPE.itemsize,
            roofline=[norm_cost("chain", B * N, C, phase="fwd", groups=G, residual=True, gate=True)],
            shape=list(shape),
            dtype=str(DTYPE),
        )


@pytest.mark.parametrize("G", [1, 2], ids=["t2v", "i2v"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, shape, G):
    B, N, C = shape
    args = _inputs(B, N, C, G, requires_grad=True)
    leaves = [a for a in args if a is not None and a.requires_grad]
    dr = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE)
    dout = torch.randn(B, N, C, device=DEVICE, dtype=DTYPE)
    fn = IMPLS[impl]

    def step():
        r, out = fn(*args)
        torch.autograd.grad((r, out), leaves, (dr, dout))

    run(
        benchmark,
        step,
        suite=SUITE,
        case=f"fwd+bwd/{impl}/G{G}",
        bytes_moved=(4 + 6) * B * N * C * DTYPE.itemsize,
        roofline=[norm_cost("chain", B * N, C, phase=p, groups=G, residual=True, gate=True) for p in ("fwd", "bwd")],
        shape=list(shape),
        dtype=str(DTYPE),
    )
