"""Property-based tests (hypothesis) of every public op against its PyTorch reference,
forward and backward: shapes with 0, 1 and odd sizes, non-contiguous inputs (transposed,
sliced, expanded-stride), fp32/bf16/fp16, adaLN ``index`` patterns, RoPE sections (even,
uneven, pass-through) in both pair layouts, ``cu_seqlens`` with empty, length-1 and
tile-crossing segments, conv strides, dilations and contexts; and invalid inputs, which must
raise TypeError/ValueError naming the argument.

The ``ci`` profile (default) runs a fixed, derandomized example budget at tiny shapes under
the Triton interpreter; ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs many more examples
with fresh randomness. The oracle is the reference in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mugv_kernels as mk
from tests.helpers import TOL

settings.register_profile("ci", max_examples=6, derandomize=True, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints as found
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _close(a, b, dtype, scale=1.0, what=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=tol["atol"] * 4 * scale, rtol=tol["rtol"] * 4 * scale,
                               msg=lambda m: f"{what}: {m}")


def _check(call, bases, views, dtype, *, scale=1.0, seed=0):
    """Run ``call(*views(bases), backend=...)`` with the Triton kernel in ``dtype`` and the
    reference in float64 on the same rounded values; compare outputs and input gradients."""
    rounded = [b.to(dtype) if b.is_floating_point() else b for b in bases]
    res = {}
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        leaves = [(b.to(dt).requires_grad_() if b.is_floating_point() else b) for b in rounded]
        out = call(*[v(x) for v, x in zip(views, leaves)], backend=backend)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        g = torch.Generator().manual_seed(seed)
        cot = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
        wrt = [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(outs, wrt, cot, allow_unused=True)
        res[backend] = (outs, grads)
    (o1, g1), (o2, g2) = res["triton"], res["reference"]
    for i, (a, b) in enumerate(zip(o1, o2, strict=True)):
        assert a.shape == b.shape and a.dtype == dtype
        _close(a, b, dtype, scale, f"output {i}")
    for i, (a, b) in enumerate(zip(g1, g2, strict=True)):
        if a is None or b is None:
            assert a is None or not a.any(), f"grad {i}"
            continue
        _close(a, b, dtype, scale * 4, f"grad {i}")


def _ident(t):
    return t


def _layout_bnc(kind):
    """A view of a ``[B, N, C]`` base: as is, transposed storage, or sliced from a wider one."""
    if kind == "transposed":
        return lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":
        return lambda t: torch.cat([t, torch.zeros_like(t[..., :3])], dim=-1)[..., : t.shape[-1]]
    return _ident


# ---------------------------------------------------------------------------------------- adaLN
@st.composite
def ada_case(draw):
    B = draw(st.integers(1, 2))
    N = draw(st.sampled_from([0, 1, 2, 5, 9]))
    C = draw(st.sampled_from([1, 3, 8, 17, 33]))
    G = draw(st.sampled_from([None, 1, 2, 3]))
    pattern = draw(st.sampled_from(["runs", "alternate", "one"]))
    return B, N, C, G, pattern


def _index(B, N, G, pattern):
    if G is None:
        return None
    n = torch.arange(N)
    if pattern == "runs":
        idx = (n * G) // max(N, 1)
    elif pattern == "alternate":
        idx = n % G
    else:
        idx = torch.zeros(N, dtype=torch.long)
    return idx.expand(B, N).clone()


@given(case=ada_case(), dtype=DTYPES, layout=st.sampled_from(["contig", "transposed", "sliced"]),
       expand_mod=st.booleans(), norm=st.sampled_from(["layer", "rms"]), affine=st.booleans(),
       fused=st.booleans(), seed=st.integers(0, 2**16))
def test_ada_norm_family_matches_reference(case, dtype, layout, expand_mod, norm, affine, fused, seed):
    B, N, C, G, pattern = case
    g = torch.Generator().manual_seed(seed)
    mshape = (B, C) if G is None else (B, G, C)
    index = _index(B, N, G, pattern)
    x, res = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    mods = [torch.randn((1,) + mshape[1:], generator=g) if expand_mod else torch.randn(mshape, generator=g)
            for _ in range(3)]
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    mv = (lambda t: t.expand(mshape)) if expand_mod else _ident
    xv = _layout_bnc(layout)
    kw = dict(index=index, norm=norm)
    if fused:
        def call(r, y, gate, shift, scale, w, b, backend):
            return mk.gated_residual_ada_layer_norm(r, y, gate, shift, scale, weight=w if affine else None,
                                                    bias=b if affine else None, backend=backend, **kw)
        _check(call, [res, x, *mods, w, b], [xv, xv, mv, mv, mv, _ident, _ident], dtype, seed=seed)
    else:
        def call(x, shift, scale, w, b, backend):
            return mk.ada_layer_norm(x, shift, scale, weight=w if affine else None, bias=b if affine else None,
                                     backend=backend, **kw)
        _check(call, [x, mods[0], mods[1], w, b], [xv, mv, mv, _ident, _ident], dtype, seed=seed)

        def call_res(r, y, gate, backend):
            return mk.gated_residual(r, y, gate, index=index, backend=backend)
        _check(call_res, [res, x, mods[2]], [xv, xv, mv], dtype, seed=seed)


# ----------------------------------------------------------------------------------------- RoPE
@st.composite
def rope_case(draw):
    D = draw(st.sampled_from([4, 8, 12, 14, 16]))
    kind = draw(st.sampled_from(["even", "uneven", "pass"]))
    if kind == "even" and D % 6 == 0:
        secs = (D // 3,) * 3
    elif kind == "pass":
        secs = (2, 0, 2) if D < 8 else (2, 2, 2)
    else:
        a = draw(st.sampled_from([0, 2]))
        secs = (a, 2, D - a - 2)
    return D, secs


@given(case=rope_case(), dtype=DTYPES, layout=st.sampled_from(["bnhd", "thd"]),
       view=st.sampled_from(["contig", "transposed", "sliced"]), interleaved=st.booleans(),
       N=st.sampled_from([0, 1, 3, 7, 18]), H=st.integers(1, 3), with_k=st.booleans(), normed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rope_matches_reference(case, dtype, layout, view, interleaved, N, H, with_k, normed, seed):
    D, secs = case
    g = torch.Generator().manual_seed(seed)
    B = 2 if layout == "bnhd" else 1
    shape = (B, N, H, D) if layout == "bnhd" else (N, H, D)
    pos = torch.randint(0, 40, (N, 3), generator=g, dtype=torch.int32)
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    wq, wk = torch.randn(D, generator=g), torch.randn(D, generator=g)
    if view == "transposed":  # heads outermost in storage
        def v(t):
            return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    elif view == "sliced":  # unit stride on D, gaps between heads
        def v(t):
            return torch.cat([t, torch.zeros_like(t[..., :2])], dim=-1)[..., :D]
    else:
        v = _ident
    if not normed:
        def call(x, backend):
            return mk.rope3d(x, pos, secs, interleaved=interleaved, backend=backend)
        _check(call, [q], [v], dtype, seed=seed)
        return

    def call(q, k, wq, wk, backend):
        return mk.qk_norm_rope3d(q, k if with_k else None, pos, secs, q_weight=wq, k_weight=wk if with_k else None,
                                 interleaved=interleaved, backend=backend)
    _check(call, [q, k, wq, wk], [v, v, _ident, _ident], dtype, seed=seed)


# ------------------------------------------------------------------------------------ attention
SEG = st.sampled_from([0, 1, 2, 5, 17, 33])


@given(q_lens=st.lists(SEG, min_size=1, max_size=3), cross=st.booleans(), k_lens_extra=st.lists(SEG, min_size=3,
       max_size=3), H=st.integers(1, 2), D=st.sampled_from([8, 12, 16]), dtype=DTYPES, sliced=st.booleans(),
       slack=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_varlen_attention_matches_reference(q_lens, cross, k_lens_extra, H, D, dtype, sliced, slack, seed):
    k_lens = k_lens_extra[: len(q_lens)] if cross else q_lens
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *k_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, val = torch.randn(Tq, H, D, generator=g), torch.randn(Tk, H, D, generator=g), torch.randn(Tk, H, D,
                                                                                                    generator=g)
    v = (lambda t: torch.stack([t, t], dim=1)[:, 0]) if sliced else _ident  # a [T, 2, H, D] slice
    mq, mk_ = max(q_lens) + slack, max(k_lens) + slack

    def call(q, k, val, backend):
        return mk.varlen_attention(q, k, val, cu_q, cu_k, mq, mk_, backend=backend)
    _check(call, [q, k, val], [v, v, v], dtype, scale=2.0, seed=seed)


# ------------------------------------------------------------------------------------ conv / GN
@given(cin=st.integers(1, 3), cout=st.integers(1, 3), T=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6),
       k=st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
       pad_mode=st.sampled_from(["zeros", "replicate"]), with_context=st.booleans(), bias=st.booleans(),
       channels_last=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_causal_conv3d_matches_reference(cin, cout, T, H, W, k, stride, dilation, pad_mode, with_context, bias,
                                         channels_last, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cin, T, H, W, generator=g)
    w = torch.randn(cout, cin, *k, generator=g) * 0.3
    b = torch.randn(cout, generator=g)
    P = dilation[0] * (k[0] - 1)
    ctx = torch.randn(1, cin, P, H, W, generator=g) if with_context and P > 0 else None
    xv = (lambda t: t.to(memory_format=torch.channels_last_3d)) if channels_last else _ident

    def call(x, w, b, *c, backend):
        return mk.causal_conv3d(x, w, b if bias else None, stride=stride, dilation=dilation, pad_mode=pad_mode,
                                context=c[0] if c else None, backend=backend)
    bases = [x, w, b] + ([ctx] if ctx is not None else [])
    _check(call, bases, [xv, _ident, _ident] + ([_ident] if ctx is not None else []), dtype, scale=4.0, seed=seed)


@given(B=st.integers(1, 2), G=st.integers(1, 3), Cg=st.integers(1, 5),
       spatial=st.sampled_from([(1,), (3, 4), (2, 3, 3), (1, 1, 1), (0, 3)]), silu=st.booleans(),
       affine=st.booleans(), view=st.sampled_from(["contig", "channels_last", "sliced"]), dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_group_norm_silu_matches_reference(B, G, Cg, spatial, silu, affine, view, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = G * Cg
    x = torch.randn(B, C, *spatial, generator=g)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    if view == "channels_last":
        def v(t):
            return t.movedim(1, -1).contiguous().movedim(-1, 1)
    elif view == "sliced":
        def v(t):
            return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]
    else:
        v = _ident

    def call(x, w, b, backend):
        return mk.group_norm_silu(x, G, w if affine else None, b if affine else None, silu=silu, backend=backend)
    _check(call, [x, w, b], [v, _ident, _ident], dtype, scale=2.0, seed=seed)


# -------------------------------------------------------------------------------- invalid input
def _bad_cases():
    x = torch.randn(2, 3, 8)
    mod = torch.randn(2, 8)
    q = torch.randn(3, 2, 12)
    pos = torch.zeros(3, 3, dtype=torch.int32)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    xc, wc = torch.randn(1, 2, 3, 4, 4), torch.randn(2, 2, 3, 3, 3)
    return {
        "ada x rank": (lambda: mk.ada_layer_norm(x[0], mod, mod), ValueError, "x"),
        "ada C mismatch": (lambda: mk.ada_layer_norm(x, mod[:, :5], mod), ValueError, "shift"),
        "ada index range": (lambda: mk.ada_layer_norm(x, mod[:, None].expand(2, 2, 8), mod[:, None].expand(2, 2, 8),
                                                      index=torch.full((2, 3), 2)), ValueError, "index"),
        "ada index dtype": (lambda: mk.ada_layer_norm(x, mod[:, None], mod[:, None], index=torch.zeros(2, 3)),
                            TypeError, "index"),
        "gated residual shapes": (lambda: mk.gated_residual(x, x[:, :2], mod), ValueError, "y"),
        "rope sections odd": (lambda: mk.rope3d(q, pos, (3, 4, 5)), ValueError, "sections"),
        "rope sections sum": (lambda: mk.rope3d(q, pos, (8, 4, 4)), ValueError, "sections"),
        "rope positions shape": (lambda: mk.rope3d(q, pos[:2], (4, 4, 4)), ValueError, "positions"),
        "rope positions negative": (lambda: mk.rope3d(q, pos - 1, (4, 4, 4)), ValueError, "positions"),
        "rope positions dtype": (lambda: mk.rope3d(q, pos.float(), (4, 4, 4)), TypeError, "positions"),
        "attn cu end": (lambda: mk.varlen_attention(q, q, q, torch.tensor([0, 2], dtype=torch.int32), cu, 3, 3),
                        ValueError, "cu_seqlens_q"),
        "attn cu decreasing": (lambda: mk.varlen_attention(q, q, q, torch.tensor([0, 2, 1, 3], dtype=torch.int32),
                                                           torch.tensor([0, 1, 2, 3], dtype=torch.int32), 3, 3),
                               ValueError, "cu_seqlens_q"),
        "attn cu count": (lambda: mk.varlen_attention(q, q, q, cu, torch.tensor([0, 1, 3], dtype=torch.int32), 3, 3),
                          ValueError, "cu_seqlens"),
        "attn max_seqlen": (lambda: mk.varlen_attention(q, q, q, cu, cu, 2, 3), ValueError, "max_seqlen_q"),
        "attn cu dtype": (lambda: mk.varlen_attention(q, q, q, cu.float(), cu, 3, 3), TypeError, "cu_seqlens_q"),
        "attn dtype mix": (lambda: mk.varlen_attention(q, q.half(), q, cu, cu, 3, 3), TypeError, "k"),
        "conv stride": (lambda: mk.causal_conv3d(xc, wc, stride=0), ValueError, "stride"),
        "conv weight rank": (lambda: mk.causal_conv3d(xc, wc[0]), ValueError, "weight"),
        "conv channels": (lambda: mk.causal_conv3d(xc, wc[:, :1]), ValueError, "weight"),
        "conv context": (lambda: mk.causal_conv3d(xc, wc, context=xc[:, :, :1, :2]), ValueError, "context"),
        "gn groups": (lambda: mk.group_norm_silu(torch.randn(1, 6, 4), 4), ValueError, "num_groups"),
        "gn weight": (lambda: mk.group_norm_silu(torch.randn(1, 6, 4), 3, torch.randn(5)), ValueError, "weight"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_invalid_inputs_raise_naming_the_argument(name):
    call, exc, arg = _bad_cases()[name]
    with pytest.raises(exc) as info:
        call()
    assert arg in str(info.value), (name, str(info.value))


# -------------------------------------------------------------------------- pinned fuzz finds
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_norm_one_value_per_group(backend):
    """Found by the fuzzer: ``[1, G, 1]`` (one value per group) made the reference raise
    F.group_norm's batch-norm check; the statistics are defined (variance 0): out = silu(bias)."""
    x = torch.randn(1, 3, 1, requires_grad=True)
    b = torch.randn(3)
    y = mk.group_norm_silu(x, 3, torch.ones(3), b, backend=backend)
    # x * rstd - mean * rstd with rstd = 1/sqrt(eps) = 1000 rounds at ~1e-4 of |x|
    torch.testing.assert_close(y, torch.nn.functional.silu(b).view(1, 3, 1), atol=2e-4, rtol=0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.zeros_like(x), atol=2e-3, rtol=0)
