"""adaLN family: Triton kernels (under the interpreter) and the CPU reference path against
the autograd of the reference math, plus opcheck, compile, gradcheck and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import assert_close, assert_close_to_ref

import mugv_kernels as mk
from mugv_kernels.nn import AdaLayerNorm, GatedResidualAdaLayerNorm
from mugv_kernels.reference.ada_norm import adaln_bwd_ref, adaln_fwd_ref, ada_norm_chain

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, N, C, G): the widths C in {72, 100, 288, 3456}, N in {0, 1, odd}, B in {1, 3}, G in {1, 2, 5}
SHAPES = [
    (1, 1, 72, 1),
    (3, 7, 100, 2),
    (1, 13, 288, 5),
    (3, 0, 72, 2),
    (1, 5, 3456, 2),
    (2, 9, 288, 1),
]


def _mod(B, G, C, dtype, *, as_3d):
    """Modulation like MUG-V's: a slice of a [B, 6, C] table (non-contiguous views)."""
    if G == 1 and not as_3d:
        table = torch.randn(B, 6, C, dtype=dtype)
        return [table[:, i] for i in range(3)]  # [B, C], stride(0) = 6C
    table = torch.randn(B, G, 6, C, dtype=dtype)
    return [table[:, :, i] for i in range(3)]  # [B, G, C], non-contiguous


def _inputs(B, N, C, G, dtype, *, noncontig=False):
    if noncontig:  # channels strided over a transposed layout: x[b, n, c] = base[b, c, n]
        x = torch.randn(B, C, N, dtype=dtype).transpose(1, 2)
        res = torch.randn(B, N, 2 * C, dtype=dtype)[..., ::2]  # C stride 2: copied once
    else:
        x = torch.randn(B, N, C, dtype=dtype)
        res = torch.randn(B, N, C, dtype=dtype)
    gate, shift, scale = _mod(B, G, C, dtype, as_3d=G > 1)
    index = torch.randint(0, G, (B, N)) if G > 1 else None
    return x, res, gate, shift, scale, index


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _fp32(ts):
    return _leaves(*[t.float() if t is not None else None for t in ts])


def _check(fn_got, fn_ref, inputs, dtype):
    """Outputs and all input gradients of ``fn_got`` against ``fn_ref``: directly in fp32;
    in bf16/fp16 by the same-dtype-reference error rule (see ``assert_close_to_ref``)."""
    got, ref, ref32 = _leaves(*inputs), _leaves(*inputs), _fp32(inputs)
    out_got, out_ref, out_ref32 = fn_got(*got), fn_ref(*ref), fn_ref(*ref32)
    for a, b, c in zip(out_got, out_ref, out_ref32):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close_to_ref(a, b, c)
    if not out_got[0].numel():
        return
    cotangents = [torch.randn(o.shape) for o in out_ref32]
    live = [i for i, t in enumerate(inputs) if t is not None]
    grads = []
    for leaves, outs in ((got, out_got), (ref, out_ref), (ref32, out_ref32)):
        loss = sum((o * g.to(o.dtype)).float().sum() for o, g in zip(outs, cotangents))
        grads.append(torch.autograd.grad(loss, [leaves[i] for i in live]))
    for a, b, c in zip(*grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close_to_ref(a, b, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,C,G", SHAPES)
def test_chain_matches_reference(B, N, C, G, dtype):
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, dtype)
    r, out = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, index=index)
    assert r.shape == out.shape == (B, N, C) and r.dtype == out.dtype == dtype
    _check(
        lambda res, x, g, sh, sc: mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=index),
        lambda res, x, g, sh, sc: ada_norm_chain(x, res, g, sh, sc, index),
        (res, x, gate, shift, scale),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("B,N,C,G", [(3, 7, 100, 2), (1, 4, 72, 1)])
def test_ada_layer_norm_affine(B, N, C, G, norm, dtype):
    x, _, _, shift, scale, index = _inputs(B, N, C, G, dtype, noncontig=True)
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    bias = b if norm == "layer" else None
    _check(
        lambda x, sh, sc, w, b: (mk.ada_layer_norm(x, sh, sc, index=index, weight=w, bias=b, norm=norm),),
        lambda x, sh, sc, w, b: ada_norm_chain(x, None, None, sh, sc, index, w, b, rms=norm == "rms")[1:],
        (x, shift, scale, w, bias),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_residual_affine_norm(dtype):
    """MUG-V's cross-attention boundary: r = residual + y, out = LayerNorm(r) with affine."""
    B, N, C = 2, 5, 288
    x, res = torch.randn(B, N, C, dtype=dtype), torch.randn(B, N, C, dtype=dtype)
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    r, out = mk.gated_residual_ada_layer_norm(res, x, None, None, None, weight=w, bias=b)
    # independent check of the values: torch's own LayerNorm
    r_torch = (res.float() + x.float()).to(dtype)
    out_torch = F.layer_norm(r_torch.float(), (C,), w.float(), b.float(), eps=1e-6)
    assert_close(r, r_torch, dtype)
    assert_close(out, out_torch, dtype)
    _check(
        lambda res, x, w, b: mk.gated_residual_ada_layer_norm(res, x, None, None, None, weight=w, bias=b),
        lambda res, x, w, b: ada_norm_chain(x, res, None, None, None, None, w, b),
        (res, x, w, b),
        dtype,
    )


@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize("G", [1, 5])
def test_gated_residual(G, with_gate):
    B, N, C = 3, 6, 100
    x, res, gate, _, _, index = _inputs(B, N, C, G, torch.float32, noncontig=True)
    if not with_gate:
        gate = index = None
    _check(
        lambda res, x, g: (mk.gated_residual(res, x, g, index=index),),
        lambda res, x, g: ada_norm_chain(x, res, g, do_norm=False, index=index)[:1],
        (res, x, gate),
        torch.float32,
    )


def test_shift_only_and_scale_only():
    B, N, C = 2, 3, 72
    x = torch.randn(B, N, C)
    shift, scale = torch.randn(B, C), torch.randn(B, C)
    xhat = F.layer_norm(x, (C,), eps=1e-6)
    assert_close(mk.ada_layer_norm(x, shift, None), xhat + shift[:, None])
    assert_close(mk.ada_layer_norm(x, None, scale), xhat * (1 + scale[:, None]))


def test_index_selects_modulation_like_public_double_norm():
    """I2V: one pass with index equals the public code's two norms + torch.where."""
    B, N, C = 2, 11, 72
    x = torch.randn(B, N, C)
    shift, scale = torch.randn(B, 2, C), torch.randn(B, 2, C)
    cond = torch.rand(B, N) < 0.3  # conditioned tokens take set 1 (t0)
    y = mk.ada_layer_norm(x, shift, scale, index=cond.long())
    xhat = F.layer_norm(x, (C,), eps=1e-6)
    y0 = xhat * (1 + scale[:, None, 0]) + shift[:, None, 0]
    y1 = xhat * (1 + scale[:, None, 1]) + shift[:, None, 1]
    assert_close(y, torch.where(cond[..., None], y1, y0))


def test_reference_backward_matches_autograd():
    """The explicit CPU backward (adaln_bwd_ref) against autograd of the reference."""
    B, N, C, G = 2, 5, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float64)
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    for rms in (False, True):
        leaves = _leaves(x, res, gate, shift, scale, w, b)
        r, out = ada_norm_chain(leaves[0], leaves[1], *leaves[2:5], index, leaves[5], leaves[6], rms=rms)
        dr, dout = torch.randn_like(r), torch.randn_like(out)
        expected = torch.autograd.grad((r * dr).sum() + (out * dout).sum(), leaves)
        _, _, mean, rstd = adaln_fwd_ref(x, res, gate, shift, scale, index, w, b, 1e-6, rms, True)
        got = adaln_bwd_ref(dr, dout, x, res, gate, shift, scale, index, w, b, r.detach(), mean, rstd, 1e-6, rms, True)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e)


def test_gradcheck_fp64():
    B, N, C, G = 2, 3, 6, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float64)
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    args = _leaves(res, x, gate, shift, scale, w, b)

    def fn(res, x, gate, shift, scale, w, b):
        r, out = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, index=index, weight=w, bias=b)
        return r, out

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda x, s, c: mk.ada_layer_norm(x, s, c, index=index, norm="rms"), args[1:2] + args[3:5])


def test_backward_with_broadcast_upstream_grads():
    """``loss = out.sum()`` hands the backward stride-0 (expanded) gradients."""
    B, N, C, G = 2, 4, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float32)
    got, ref = _leaves(res, x, gate, shift, scale), _leaves(res, x, gate, shift, scale)
    r, out = mk.gated_residual_ada_layer_norm(*got, index=index)
    r_ref, out_ref = ada_norm_chain(ref[1], ref[0], *ref[2:], index)
    (r.sum() + 2 * out.sum()).backward()
    (r_ref.sum() + 2 * out_ref.sum()).backward()
    for a, b in zip(got, ref):
        assert_close(a.grad, b.grad)


def test_validate_false_skips_only_the_index_range_check():
    B, N, C, G = 2, 5, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float32)
    checked = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, index=index)
    unchecked = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, index=index, validate=False)
    for a, b in zip(checked, unchecked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="index must have shape"):  # shape checks still run
        mk.ada_layer_norm(x, shift, scale, index=index[:, :2], validate=False)


def test_empty_tokens_give_empty_outputs_and_zero_grads():
    B, N, C, G = 2, 0, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float32)
    leaves = _leaves(res, x, gate, shift, scale)
    r, out = mk.gated_residual_ada_layer_norm(*leaves, index=index)
    assert r.shape == out.shape == (B, 0, C)
    (out.sum() + r.sum()).backward()
    for t in leaves[2:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(residual=True, gate=True, shift=True, scale=True, index=True, weight=False, rms=False),
        dict(residual=False, gate=False, shift=True, scale=True, index=False, weight=True, rms=True),
        dict(residual=True, gate=False, shift=False, scale=False, index=False, weight=True, rms=False),
    ],
    ids=["chain-index", "adaln-rms-affine", "residual-affine-norm"],
)
def test_opcheck(kwargs):
    B, N, C, G = 2, 3, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G if kwargs["index"] else 1, torch.float32)
    w = torch.randn(C)
    fwd_args = (
        x.requires_grad_(),
        res.requires_grad_() if kwargs["residual"] else None,
        gate.requires_grad_() if kwargs["gate"] else None,
        shift.requires_grad_() if kwargs["shift"] else None,
        scale.requires_grad_() if kwargs["scale"] else None,
        index if kwargs["index"] else None,
        w.requires_grad_() if kwargs["weight"] else None,
        w.clone().requires_grad_() if kwargs["weight"] and not kwargs["rms"] else None,
        1e-6,
        kwargs["rms"],
        True,
    )
    torch.library.opcheck(torch.ops.mugv.adaln_fwd, fwd_args)
    with torch.no_grad():
        r, out, mean, rstd = torch.ops.mugv.adaln_fwd(*fwd_args)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in fwd_args]
    bwd_args = (
        torch.randn_like(r) if kwargs["residual"] else None,
        torch.randn_like(out),
        *plain[:8],
        r if kwargs["residual"] else None,
        mean,
        rstd,
        *plain[8:],
    )
    torch.library.opcheck(torch.ops.mugv.adaln_bwd, bwd_args)


def test_compile_fullgraph():
    """A MUG-V-style sub-layer boundary compiled whole (no graph break), fwd + bwd."""
    B, N, C, G = 2, 5, 72, 2
    x, res, gate, shift, scale, index = _inputs(B, N, C, G, torch.float32)

    def block(res, x, gate, shift, scale, index):
        r, h = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, index=index)
        h = mk.ada_layer_norm(torch.tanh(h), shift, scale, index=index)
        return mk.gated_residual(r, h, gate, index=index)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, ref = _leaves(res, x, gate, shift, scale), _leaves(res, x, gate, shift, scale)  # noqa: F841
    out = compiled(*got, index)
    expected = block(*ref, index)
    assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for a, b in zip(got, ref):
        assert_close(a.grad, b.grad)


def test_modules_match_functions():
    B, N, C = 2, 4, 72
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    shift, scale, gate = torch.randn(3, B, C).unbind(0)
    norm = AdaLayerNorm(C)
    assert list(norm.parameters()) == []
    assert_close(norm(x, shift, scale), mk.ada_layer_norm(x, shift, scale))
    affine = GatedResidualAdaLayerNorm(C, elementwise_affine=True)
    with torch.no_grad():
        affine.weight.normal_()
        affine.bias.normal_()
    r, out = affine(res, x, gate, shift, scale)
    r2, out2 = mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, weight=affine.weight, bias=affine.bias)
    assert_close(r, r2)
    assert_close(out, out2)
    out.sum().backward()
    assert affine.weight.grad is not None and affine.bias.grad is not None
    assert AdaLayerNorm(C, norm="rms", elementwise_affine=True).bias is None


def test_large_index_math_is_int64():
    """Row offsets are int64: the launch takes B*N rows of C channels beyond 2^31 elements
    (checked on meta tensors: nothing is allocated)."""
    from mugv_kernels._registry import capture_launches
    from mugv_kernels.ops.ada_norm import _adaln_fwd_launch

    B, N, C = 1, 700_000, 3456  # 2.4e9 elements
    x = torch.empty(B, N, C, device="meta", dtype=torch.bfloat16)
    mod = torch.empty(B, C, device="meta", dtype=torch.bfloat16)
    with capture_launches() as launches:
        _adaln_fwd_launch(x, None, None, mod, mod, None, None, None, 1e-6, False, True)
    assert launches[0].grid == (B * N,)
    assert B * N * C > 2**31


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("C", [1152, 3456])
def test_cuda_kernels_match_reference(C):
    """The compiled kernels on a GPU, at the model widths, bf16, T2V and I2V."""
    B, N, G = 2, 257, 2
    x, res, gate, shift, scale, index = (
        t.cuda() if t is not None else None for t in _inputs(B, N, C, G, torch.bfloat16)
    )
    _check(
        lambda res, x, g, sh, sc: mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=index),
        lambda res, x, g, sh, sc: ada_norm_chain(x, res, g, sh, sc, index),
        (res, x, gate, shift, scale),
        torch.bfloat16,
    )


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, m: mk.ada_layer_norm(x[0], m, m), ValueError, "x must be 3-D"),
        (lambda x, m: mk.ada_layer_norm(x.long(), m, m), TypeError, "x must have dtype"),
        (lambda x, m: mk.ada_layer_norm(x, m[:, :5], m), ValueError, "shift must be"),
        (lambda x, m: mk.ada_layer_norm(x, m.int(), m), TypeError, "shift must have dtype"),
        (
            lambda x, m: mk.ada_layer_norm(x, m[:, None].expand(-1, 2, -1), m[:, None].expand(-1, 3, -1)),
            ValueError,
            "share G",
        ),
        (lambda x, m: mk.ada_layer_norm(x, m[:, None].expand(-1, 2, -1), None), ValueError, "pass index"),
        (
            lambda x, m: mk.ada_layer_norm(x, m[:, None].expand(-1, 2, -1), None, index=torch.full((2, 3), 2)),
            ValueError,
            r"index values must lie in \[0, 2\)",
        ),
        (
            lambda x, m: mk.ada_layer_norm(x, m[:, None].expand(-1, 2, -1), None, index=torch.zeros(2, 4).long()),
            ValueError,
            "index must have shape",
        ),
        (
            lambda x, m: mk.ada_layer_norm(x, m[:, None].expand(-1, 2, -1), None, index=torch.zeros(2, 3)),
            TypeError,
            "index must have dtype",
        ),
        (lambda x, m: mk.ada_layer_norm(x, m, m, weight=torch.ones(5)), ValueError, "weight must have shape"),
        (lambda x, m: mk.ada_layer_norm(x, m, m, norm="group"), ValueError, "norm must be"),
        (lambda x, m: mk.ada_layer_norm(x, m, m, eps=0.0), ValueError, "eps must be"),
        (lambda x, m: mk.ada_layer_norm(x, m.to("meta"), m), ValueError, "shift is on meta"),
        (lambda x, m: mk.gated_residual(x, x[:, :2], m), ValueError, "residual shape"),
        (lambda x, m: mk.gated_residual(x.half(), x, m), TypeError, "residual dtype"),
        (lambda x, m: mk.gated_residual(x, x, "gate"), TypeError, "gate must be a torch.Tensor"),
        (lambda x, m: mk.ada_layer_norm(x[..., :0], m[:, :0], None), ValueError, "1 <= C"),
    ],
)
def test_bad_input(make, exc, match):
    x, m = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(exc, match=match):
        make(x, m)
