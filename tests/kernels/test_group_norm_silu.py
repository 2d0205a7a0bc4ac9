"""Fused GroupNorm + SiLU (``mk.group_norm_silu``, ``mugv_kernels.nn.GroupNormSiLU``)
against ``F.silu(F.group_norm(...))`` in fp32, forward and gradients (x, weight, bias),
through the Triton kernels under the interpreter; layouts, odd and empty shapes,
statistics robustness, opcheck, compile, gradcheck and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import assert_close

import mugv_kernels as mk
from mugv_kernels.nn import GroupNormSiLU

CL = torch.channels_last_3d


def reference(x, G, w, b, eps=1e-6, silu=True):
    y = F.group_norm(x.float(), G, w.float() if w is not None else None, b.float() if b is not None else None, eps)
    return F.silu(y) if silu else y


# (shape, groups, channels_last, affine, silu, dtype)
CASES = [
    ((2, 8, 3, 5, 7), 4, False, True, True, torch.float32),
    ((2, 8, 3, 5, 7), 2, True, True, True, torch.float32),
    ((1, 6, 2, 3, 5), 6, True, False, True, torch.float32),
    ((2, 6, 4, 3), 3, False, True, False, torch.float32),
    ((3, 4, 113), 1, False, True, True, torch.float32),
    ((3, 4), 2, False, True, True, torch.float32),
    ((2, 16, 3, 4, 5), 4, True, True, True, torch.bfloat16),
    ((2, 16, 3, 2, 5), 8, True, True, True, torch.bfloat16),  # 2 channels per group: tiles of 4 groups
    ((2, 12, 2, 3, 3), 3, False, True, True, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[1]}-{'cl' if c[2] else 'c'}-{str(c[5])[6:]}")
def test_forward_backward(case):
    shape, G, cl, affine, silu, dtype = case
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    if cl:
        x = x.contiguous(memory_format=CL)
    C = shape[1]
    w = (torch.rand(C) + 0.5).to(dtype) if affine else None
    b = torch.randn(C).to(dtype) if affine else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = mk.group_norm_silu(x, G, w, b, silu=silu)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    yr = reference(ref_leaves[0], G, *(ref_leaves[1:] if affine else (None, None)), silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert_close(y, yr)
    dy = torch.randn_like(yr)
    for g, r, t in zip(torch.autograd.grad(y, leaves, dy.to(dtype)), torch.autograd.grad(yr, ref_leaves, dy), leaves):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, scale=4)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # masked lanes, interpreter
def test_large_offset_statistics():
    """A large common offset (mean >> std): the chunked Welford/Chan merge keeps fp32
    statistics accurate where E[x^2] - E[x]^2 would cancel."""
    x = torch.randn(1, 4, 3, 16, 16, dtype=torch.float64) + 1000.0
    y = mk.group_norm_silu(x.float(), 2)
    assert_close(y, reference(x, 2, None, None).float(), scale=50)


def test_non_dense_layout_and_noncontiguous_grad():
    x = torch.randn(2, 4, 6, 5)[:, :, ::2]  # positions do not collapse: copied once
    y = mk.group_norm_silu(x, 2)
    assert_close(y, reference(x, 2, None, None))
    x = torch.randn(1, 4, 2, 3, 3, requires_grad=True)
    dy = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=CL)
    (gx,) = torch.autograd.grad(mk.group_norm_silu(x, 4), x, dy)
    xr = x.detach().requires_grad_()
    (rx,) = torch.autograd.grad(reference(xr, 4, None, None), xr, dy)
    assert_close(gx, rx, scale=4)


def test_groups_per_tile_rule():
    """Channels innermost and a group's run under 16 bytes: the fewest groups (a power of
    two dividing G) that make a 16-byte run; else one group per tile."""
    from mugv_kernels.ops.group_norm import groups_per_tile

    assert groups_per_tile(4, 32, 1, 2) == 2  # the VAE's 128 channels in 32 groups, bf16
    assert groups_per_tile(1, 32, 1, 2) == 8 and groups_per_tile(2, 8, 1, 2) == 4
    assert groups_per_tile(8, 32, 1, 2) == 1 and groups_per_tile(4, 32, 1, 4) == 1  # already 16 bytes
    assert groups_per_tile(4, 32, 640, 2) == 1  # NCDHW: positions are the contiguous run
    assert groups_per_tile(1, 6, 1, 4) == 2  # limited by G
    assert groups_per_tile(3, 32, 1, 2) == 1 and groups_per_tile(2, 3, 1, 2) == 1


def test_empty():
    x = torch.randn(2, 4, 0, 3, 3, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    y = mk.group_norm_silu(x, 2, w, None)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4))


def test_module_loads_group_norm_state():
    ref = torch.nn.GroupNorm(2, 6, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    mod = GroupNormSiLU(2, 6)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(1, 6, 2, 3, 4)
    assert_close(mod(x), F.silu(ref(x)))
    assert "silu=True" in repr(mod)
    plain = GroupNormSiLU(3, 6, affine=False, silu=False)
    assert plain.weight is None
    assert_close(plain(x), F.group_norm(x, 3, eps=1e-6))
    assert mk.group_norm_silu(x, 2, backend="reference").shape == x.shape


def test_gradcheck_fp64():
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: mk.group_norm_silu(x, 2, w, b), (x, w, b))


def test_opcheck():
    x = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.mugv.group_norm_silu_fwd, (x, w, b, 2, 1e-6, True))
    y, mean, rstd = torch.ops.mugv.group_norm_silu_fwd(x.detach(), w.detach(), b.detach(), 2, 1e-6, True)
    torch.library.opcheck(
        torch.ops.mugv.group_norm_silu_bwd, (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, 2, 1e-6, True)
    )


def test_compile_fullgraph():
    mod = GroupNormSiLU(2, 4)
    x = torch.randn(1, 4, 2, 3, 3, requires_grad=True)
    y = torch.compile(mod, fullgraph=True, backend="aot_eager")(x)
    assert_close(y, mod(x))
    y.sum().backward()
    assert x.grad is not None and mod.weight.grad is not None


def test_bad_input():
    x = torch.randn(2, 6, 3, 4)
    with pytest.raises(ValueError, match="divisor"):
        mk.group_norm_silu(x, 4)
    with pytest.raises(ValueError, match="divisor"):
        mk.group_norm_silu(x, 0)
    with pytest.raises(ValueError, match="weight must have shape"):
        mk.group_norm_silu(x, 2, torch.ones(5))
    with pytest.raises(ValueError, match="eps"):
        mk.group_norm_silu(x, 2, eps=0.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.group_norm_silu(x.int(), 2)
    with pytest.raises(TypeError, match="weight must have dtype"):
        mk.group_norm_silu(x, 2, torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2-D"):
        mk.group_norm_silu(x[0, 0, 0], 1)
    with pytest.raises(ValueError, match="backend"):
        mk.group_norm_silu(x, 2, backend="apex")
    with pytest.raises(ValueError, match="must divide"):
        GroupNormSiLU(4, 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu(backend):
    from mugv_kernels._registry import cuda_extension

    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("mugv_kernels._C not built")
    for cl in (False, True):
        x = torch.randn(2, 128, 5, 36, 64, device="cuda", dtype=torch.bfloat16) + 3
        if cl:
            x = x.contiguous(memory_format=CL)
        w = torch.rand(128, device="cuda") + 0.5
        b = torch.randn(128, device="cuda")
        y = mk.group_norm_silu(x, 32, w, b, backend=backend)
        assert y.stride() == x.stride()
        assert_close(y, reference(x, 32, w, b))


@pytest.mark.parametrize("cl", [False, True])
def test_many_tiles_and_chunks(monkeypatch, cl):
    """Small tiles and many programs: several tiles per chunk and several chunks per group,
    so the in-kernel Welford merge and the host-side Chan merge of chunks both run."""
    from mugv_kernels.ops import group_norm

    monkeypatch.setattr(group_norm, "INTERPRET_TILE_ELEMS", 32)
    monkeypatch.setattr(group_norm, "CPU_PROGRAMS", 12)
    x = torch.randn(1, 8, 2, 5, 7) * 3 + 5
    if cl:
        x = x.contiguous(memory_format=CL)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    gpt = group_norm.groups_per_tile(2, 4, 1 if cl else 70, x.element_size())
    assert gpt == (2 if cl else 1)  # channels-last fp32: tiles of two 8-byte groups
    block_s, _, s_per_chunk, _ = group_norm.gn_config(70, 2, 4, x.device, groups_per_tile=gpt)
    assert s_per_chunk > block_s and 70 > s_per_chunk  # >1 tile per chunk, >1 chunk
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = mk.group_norm_silu(x, 4, w, b)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    yr = reference(*ref_leaves[:1], 4, *ref_leaves[1:])
    assert_close(y, yr)
    dy = torch.randn_like(yr)
    for g, r in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(yr, ref_leaves, dy)):
        assert_close(g, r, scale=4)
