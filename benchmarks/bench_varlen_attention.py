"""Packed variable-length attention benchmarks: every available backend of
``mk.varlen_attention`` on a packed mixed batch against padding the batch to its longest
clip and masking the padded keys, forward and forward+backward.

GPU shapes: four clips of 36002, 18002, 9002 and 4502 tokens (MUG-V 720p at
3 s and shorter / smaller clips), 48 heads, head_dim 72 (MUG-V 10B), bf16, self-attention;
and the 36002-token clip alone (target: >= 60% of the bf16 dense peak). On CPU the
suite runs a tiny batch in fp32 so it stays exercised (no figure is recorded there).

Useful work: ``4 * H * D * sum_b Nq_b * Nk_b`` FLOPs forward (QK^T and PV, 2 FLOPs per
multiply-add), 2.5x that for the backward (five matmuls of the same size: dV, dP, dS->dQ,
dS->dK, plus the recomputed QK^T), 3.5x forward+backward. The padded batch is credited
with the same useful FLOPs, though it computes ``B * Lmax^2`` score entries: the ratio of
TFLOP/s between a packed backend and the padded batch is the speedup of packing.
The fraction of the device's bf16 dense peak is attached by ``_common.run`` on GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mugv_kernels as mk
from benchmarks._common import DEVICE, ON_GPU, run
from mugv.perf import varlen_attention_cost

SUITE = "varlen_attention"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEADS, HEAD_DIM = (48, 72) if ON_GPU else (1, 72)
BATCHES = {"mixed4": [36002, 18002, 9002, 4502], "clip36002": [36002]} if ON_GPU else {"mixed4": [40, 20, 9, 5]}


def useful_flops(lengths: list[int], backward: bool) -> float:
    fwd = 4.0 * HEADS * HEAD_DIM * sum(n * n for n in lengths)
    return fwd * (3.5 if backward else 1.0)


def _packed(lengths, requires_grad):
    def t():
        parts = [torch.randn(n, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for n in lengths]
        packed, cu, max_seqlen = mk.pack(parts)
        return packed.requires_grad_(requires_grad), cu, max_seqlen

    (q, cu, m), (k, _, _), (v, _, _) = t(), t(), t()
    return q, k, v, cu, m


def _padded(lengths, requires_grad):
    """``[B, H, Lmax, D]`` tensors and a key-padding mask ``[B, 1, 1, Lmax]``."""
    B, L = len(lengths), max(lengths)

    def t():
        return torch.randn(B, HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)

    keep = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    return t(), t(), t(), keep[:, None, None, :]


def _backends(requires_grad: bool) -> list[str]:
    avail = mk.varlen_attention_backends(DEVICE, DTYPE, HEAD_DIM, requires_grad=requires_grad)
    names = [name for name, why in avail.items() if why is None]
    if DEVICE == "cpu":  # eager CPU flex materializes every score: not a benchmark
        names = [n for n in names if n != "flex"]
    return names


def _case(benchmark, batch, impl, backward):
    lengths = BATCHES[batch]
    if impl == "padded":
        q, k, v, mask = _padded(lengths, backward)

        def fn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    else:
        q, k, v, cu, m = _packed(lengths, backward)

        def fn():
            return mk.varlen_attention(q, k, v, cu, cu, m, m, backend=impl, validate=False)

    if backward:
        dout = torch.randn_like(q)
        leaves = (q, k, v)

        def step():
            torch.autograd.grad(fn(), leaves, dout)

    else:

        def step():
            with torch.no_grad():
                fn()

    run(
        benchmark,
        step,
        suite=SUITE,
        case=f"{'fwd+bwd' if backward else 'fwd'}/{impl}/{batch}",
        flops=useful_flops(lengths, backward),
        rounds=10 if ON_GPU else 2,
        roofline=[varlen_attention_cost("attn", lengths, lengths, HEADS, HEAD_DIM, phase=p, itemsize=DTYPE.itemsize)
                  for p in (("fwd", "bwd") if backward else ("fwd",))],
        lengths=lengths,
        heads=HEADS,
        head_dim=HEAD_DIM,
        dtype=str(DTYPE),
    )


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("impl", _backends(requires_grad=False) + ["padded"])
def test_forward(benchmark, impl, batch):
    if batch != "mixed4" and impl == "padded":
        pytest.skip("one clip has no padding")
    _case(benchmark, batch, impl, backward=False)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("impl", _backends(requires_grad=True) + ["padded"])
def test_forward_backward(benchmark, impl, batch):
    if batch != "mixed4" and impl == "padded":
        pytest.skip("one clip has no padding")
    if ON_GPU and impl in ("reference",):
        pytest.skip("the fp32 reference loop is a correctness tool, not a GPU backend")
    _case(benchmark, batch, impl, backward=True)
