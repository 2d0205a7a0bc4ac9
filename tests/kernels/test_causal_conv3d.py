"""Causal 3D convolution (``mk.causal_conv3d``, ``mugv_kernels.nn.CausalConv3d``) against
``F.conv3d`` on an explicitly padded input (``F.pad``/``torch.cat``, built here in the
test independently of the library's reference), forward and every gradient, through the
Triton kernels under the interpreter; plus streaming, opcheck, compile, gradcheck and
bad input. Shapes are tiny on purpose (the interpreter runs each program in Python)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import assert_close

import mugv_kernels as mk
from mugv_kernels.nn import CausalConv3d
from mugv_kernels.reference.conv3d import causal_conv3d_ref

CL = torch.channels_last_3d


def padded_conv(x, w, b, stride, dilation, time_padding, pad_mode, context=None):
    """The op's definition, written out: pad time (zeros / edge copies / context),
    pad space with zeros of dilation*(k//2), then F.conv3d without padding."""
    kT, kH, kW = w.shape[2:]
    if time_padding == "causal":
        front, back = dilation[0] * (kT - 1), 0
    else:
        total = dilation[0] * (kT - 1) + 1 - stride[0]
        front, back = total // 2, total - total // 2
    if context is not None:
        x = torch.cat([context, x], 2)
    elif front > 0:
        pad = x[:, :, :1].expand(-1, -1, front, -1, -1) if pad_mode == "replicate" else torch.zeros_like(x[:, :, :1]).expand(-1, -1, front, -1, -1)
        x = torch.cat([pad, x], 2)
    elif front < 0:
        x = x[:, :, -front:]
    if back > 0:
        pad = x[:, :, -1:].expand(-1, -1, back, -1, -1) if pad_mode == "replicate" else torch.zeros_like(x[:, :, :1]).expand(-1, -1, back, -1, -1)
        x = torch.cat([x, pad], 2)
    elif back < 0:
        x = x[:, :, : x.shape[2] + back]
    ph, pw = dilation[1] * (kH // 2), dilation[2] * (kW // 2)
    x = F.pad(x, (pw, pw, ph, ph))
    return F.conv3d(x, w, b, stride=stride, dilation=dilation)


# (kernel, stride, dilation, time_padding, pad_mode, channels_last, dtype, bias)
CASES = [
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), "causal", "zeros", False, torch.float32, True),
    ((3, 3, 3), (2, 2, 2), (1, 1, 1), "symmetric", "replicate", True, torch.float32, True),
    ((3, 1, 1), (2, 1, 1), (2, 1, 1), "causal", "replicate", False, torch.float32, True),
    ((1, 3, 3), (1, 2, 2), (1, 1, 1), "symmetric", "zeros", True, torch.float32, False),
    ((1, 1, 1), (1, 1, 1), (1, 1, 1), "causal", "zeros", False, torch.float32, True),
    ((1, 1, 1), (2, 1, 1), (1, 1, 1), "symmetric", "replicate", False, torch.float32, True),
    ((3, 1, 1), (1, 1, 1), (2, 1, 1), "symmetric", "zeros", True, torch.float32, True),
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), "causal", "replicate", True, torch.bfloat16, True),
    ((3, 1, 1), (2, 1, 1), (1, 1, 1), "symmetric", "replicate", False, torch.bfloat16, True),
    ((1, 3, 3), (1, 1, 1), (1, 1, 1), "causal", "zeros", True, torch.float16, True),
]


def _ids(case):
    k, s, d, tp, pm, cl, dt, _ = case
    return f"k{''.join(map(str, k))}-s{''.join(map(str, s))}-d{d[0]}-{tp}-{pm}-{'cl' if cl else 'ncdhw'}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_backward_vs_padded_conv(case):
    k, stride, dilation, tp, pm, cl, dtype, has_bias = case
    # C_in = 3: the flattened-(tap, channel) reduction; 10: per tap, then channels
    C_in = 3 if CASES.index(case) % 2 == 0 else 10
    B, C_out, T, H, W = 2, 5, 5, 5, 4
    x = torch.randn(B, C_in, T, H, W).to(dtype)
    if cl:
        x = x.contiguous(memory_format=CL)
    w = (torch.randn(C_out, C_in, *k) / 3).to(dtype)
    b = torch.randn(C_out).to(dtype) if has_bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = mk.causal_conv3d(x, w, b, stride=stride, dilation=dilation, time_padding=tp, pad_mode=pm)
    # reference in fp32 on the same (rounded) values
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    xr, wr = ref_leaves[0], ref_leaves[1]
    br = ref_leaves[2] if has_bias else None
    yr = padded_conv(xr, wr, br, stride, dilation, tp, pm)
    assert y.shape == yr.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert_close(y, yr, scale=4)
    dy = torch.randn_like(yr)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    ref_grads = torch.autograd.grad(yr, ref_leaves, dy)
    for g, r, t in zip(grads, ref_grads, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_close(g, r, scale=8)
    assert grads[0].is_contiguous(memory_format=CL if cl else torch.contiguous_format)


def test_library_reference_matches_definition():
    """The library's reference (the CPU / fp64 path) equals the written-out definition."""
    x, w, b = torch.randn(1, 2, 4, 3, 5), torch.randn(3, 2, 3, 3, 1), torch.randn(3)
    for tp in ("causal", "symmetric"):
        for pm in ("zeros", "replicate"):
            got = causal_conv3d_ref(x, w, b, stride=(2, 1, 1), dilation=(2, 1, 1), time_padding=tp, pad_mode=pm)
            assert_close(got, padded_conv(x, w, b, (2, 1, 1), (2, 1, 1), tp, pm))
            assert_close(mk.causal_conv3d(x, w, b, stride=(2, 1, 1), dilation=(2, 1, 1), time_padding=tp, pad_mode=pm, backend="reference"), got)


@pytest.mark.parametrize("kernel, stride, tp, pm", [
    ((3, 3, 1), (1, 1, 1), "causal", "replicate"),
    ((3, 1, 1), (2, 1, 1), "symmetric", "replicate"),
    ((1, 1, 1), (4, 1, 1), "symmetric", "zeros"),   # total = -3: crops 2 frames before, 1 after
    ((1, 1, 1), (4, 1, 1), "symmetric", "replicate"),
    ((2, 1, 1), (1, 1, 1), "causal", "zeros"),
], ids=str)  # fmt: skip
def test_fp64_reference_path_and_gradients(kernel, stride, tp, pm):
    """fp64 runs the library reference inside the op (forward and the explicit backward);
    both match the written-out definition and its autograd, negative (cropping) time
    padding and the replicate folds included."""
    x = torch.randn(1, 2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = mk.causal_conv3d(x, w, b, stride=stride, time_padding=tp, pad_mode=pm)
    yr = padded_conv(x, w, b, stride, (1, 1, 1), tp, pm)
    assert_close(y, yr)
    dy = torch.randn_like(yr)
    for g, r in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(yr, (x, w, b), dy)):
        assert_close(g, r)
    assert_close(causal_conv3d_ref(x, w, b, stride=stride, time_padding=tp, pad_mode=pm), yr)


def test_reference_empty_and_zero_frame_context():
    x = torch.randn(1, 2, 0, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = mk.causal_conv3d(x, w)
    assert y.shape == (1, 2, 0, 3, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert mk.causal_conv3d(x, w, backend="reference").shape == (1, 2, 0, 3, 3)
    # kT = 1: P = 0, an empty context is accepted and ignored
    x = torch.randn(1, 2, 2, 3, 3)
    w1 = torch.randn(2, 2, 1, 3, 3)
    assert_close(mk.causal_conv3d(x, w1, context=torch.randn(1, 2, 0, 3, 3)), mk.causal_conv3d(x, w1))


def test_context_and_its_gradient():
    """context replaces the causal front padding; dcontext is the gradient of those frames."""
    B, C_in, C_out, T, H, W = 1, 4, 3, 3, 4, 3
    x = torch.randn(B, C_in, T, H, W, requires_grad=True)
    ctx = torch.randn(B, C_in, 4, H, W, requires_grad=True)  # P = 2 * (3 - 1)
    w = torch.randn(C_out, C_in, 3, 1, 3, requires_grad=True)
    y = mk.causal_conv3d(x, w, None, dilation=(2, 1, 1), pad_mode="replicate", context=ctx)
    yr = padded_conv(x, w, None, (1, 1, 1), (2, 1, 1), "causal", "zeros", context=ctx)
    assert_close(y, yr, scale=4)
    dy = torch.randn_like(yr)
    for g, r in zip(torch.autograd.grad(y, (x, ctx, w), dy), torch.autograd.grad(yr, (x, ctx, w), dy)):
        assert_close(g, r, scale=8)


def test_non_contiguous_input():
    """Any strides: a time-strided view is read in place (no copy needed)."""
    base = torch.randn(1, 3, 8, 4, 5)
    x = base[:, :, ::2]
    w = torch.randn(2, 3, 3, 3, 3)
    assert_close(mk.causal_conv3d(x, w), padded_conv(x, w, None, (1, 1, 1), (1, 1, 1), "causal", "zeros"), scale=4)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("stride_t", [1, 2])
def test_streaming_equals_one_pass(pad_mode, stride_t):
    """Chunks carried with their context give the one-pass output frame for frame (a
    1-frame chunk shorter than P included)."""
    conv = CausalConv3d(3, 4, (3, 1, 3), stride=(stride_t, 1, 1), pad_mode=pad_mode)
    x = torch.randn(1, 3, 8, 2, 3)
    full = conv(x)
    sizes = [2, 4, 2] if stride_t == 2 else [1, 3, 4]  # first chunk shorter than P
    outs, ctx, t0 = [], None, 0
    for n in sizes:
        y, ctx = conv.forward_chunk(x[:, :, t0 : t0 + n], ctx)
        outs.append(y)
        t0 += n
    assert_close(torch.cat(outs, 2), full, scale=4)
    assert ctx.shape == (1, 3, 2, 2, 3)


def test_module_matches_nn_conv3d_parameters():
    """Parameters named like nn.Conv3d: a Conv3d state dict loads and gives the same conv."""
    ref = torch.nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
    conv = CausalConv3d(3, 4, (1, 3, 3))
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 2, 5, 4)
    assert_close(conv(x), ref(x), scale=4)
    assert "kernel_size=(1, 3, 3)" in repr(conv)


def test_empty_time():
    x = torch.randn(2, 3, 0, 4, 4, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, 3, requires_grad=True)
    y = mk.causal_conv3d(x, w, torch.zeros(5))
    assert y.shape == (2, 5, 0, 4, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_size_one_dims():
    x = torch.randn(1, 1, 1, 1, 1)
    w = torch.randn(2, 1, 3, 3, 3)
    assert_close(mk.causal_conv3d(x, w, pad_mode="replicate"), padded_conv(x, w, None, (1, 1, 1), (1, 1, 1), "causal", "replicate"))


def test_gradcheck_fp64():
    x = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, w, b: mk.causal_conv3d(x, w, b, context=c), (x, ctx, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w: mk.causal_conv3d(x, w, stride=(2, 1, 1), time_padding="symmetric", pad_mode="replicate"), (x, w)
    )


def test_opcheck():
    x = torch.randn(1, 2, 3, 2, 2, requires_grad=True)
    ctx = torch.randn(1, 2, 2, 2, 2)
    w = torch.randn(2, 2, 3, 1, 1, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    torch.library.opcheck(torch.ops.mugv.causal_conv3d_fwd, (x, ctx, w, b, [1, 1, 1], [1, 1, 1], 2, 0, False))
    torch.library.opcheck(torch.ops.mugv.causal_conv3d_fwd, (x, None, w, None, [2, 1, 1], [1, 1, 1], 1, 0, True))
    dy = torch.randn(1, 2, 3, 2, 2)
    torch.library.opcheck(
        torch.ops.mugv.causal_conv3d_bwd,
        (dy, x.detach(), ctx, w.detach(), [1, 1, 1], [1, 1, 1], 2, 0, False, [True, True, True, True]),
    )


def test_compile_fullgraph():
    conv = CausalConv3d(2, 3, (3, 1, 3))
    x = torch.randn(1, 2, 3, 2, 3, requires_grad=True)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert_close(y, conv(x), scale=4)
    y.sum().backward()
    assert x.grad is not None


def test_bad_input():
    x, w = torch.randn(1, 3, 2, 4, 4), torch.randn(2, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="odd"):
        mk.causal_conv3d(x, torch.randn(2, 3, 3, 2, 3))
    with pytest.raises(ValueError, match="C_in=3"):
        mk.causal_conv3d(x, torch.randn(2, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="context must have shape"):
        mk.causal_conv3d(x, w, context=torch.randn(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="time_padding='causal'"):
        mk.causal_conv3d(x, w, context=torch.randn(1, 3, 2, 4, 4), time_padding="symmetric")
    with pytest.raises(ValueError, match="stride must be positive"):
        mk.causal_conv3d(x, w, stride=(0, 1, 1))
    with pytest.raises(ValueError, match="dilation must be positive"):
        mk.causal_conv3d(x, w, dilation=-1)
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.causal_conv3d(x.int(), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        mk.causal_conv3d(x, w.int())
    with pytest.raises(TypeError, match="stride must be an int or a tuple of three ints"):
        mk.causal_conv3d(x, w, stride=(1, 1.0, 1))
    with pytest.raises(ValueError, match="bias"):
        mk.causal_conv3d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="5-D"):
        mk.causal_conv3d(x[0], w)
    with pytest.raises(ValueError, match="time_padding"):
        mk.causal_conv3d(x, w, time_padding="same")
    with pytest.raises(ValueError, match="pad_mode"):
        mk.causal_conv3d(x, w, pad_mode="reflect")
    with pytest.raises(ValueError, match="backend"):
        mk.causal_conv3d(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="backend='cuda'"):
        mk.causal_conv3d(x, w, backend="cuda")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mk.causal_conv3d(x.numpy(), w)
    with pytest.raises(ValueError, match="odd"):
        CausalConv3d(3, 2, (3, 2, 3))
    with pytest.raises(ValueError, match="tuple of three ints"):
        mk.causal_conv3d(x, w, stride=(1, 1))
    with pytest.raises(ValueError, match="kernel size must be positive"):
        mk.causal_conv3d(x, torch.randn(2, 3, 0, 3, 3))
    with pytest.raises(TypeError, match="context dtype"):
        mk.causal_conv3d(x, w, context=torch.randn(1, 3, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="streaming needs time_padding='causal'"):
        CausalConv3d(3, 2, 3, time_padding="symmetric").forward_chunk(x)
    assert CausalConv3d(3, 2, (1, 3, 3)).next_context(x) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16(backend):
    """The compiled kernels on a GPU (the CUDA backend when _C was built)."""
    from mugv_kernels._registry import cuda_extension

    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("mugv_kernels._C not built")
    for C_in, k, cl, rep in ((64, (3, 3, 3), True, False), (3, (3, 3, 3), False, True), (32, (3, 1, 1), False, False)):
        x = torch.randn(2, C_in, 9, 20, 36, device="cuda", dtype=torch.bfloat16)
        if cl:
            x = x.contiguous(memory_format=CL)
        w = (torch.randn(48, C_in, *k, device="cuda") / (C_in * 9) ** 0.5).bfloat16()
        b = torch.randn(48, device="cuda", dtype=torch.bfloat16)
        pm = "replicate" if rep else "zeros"
        y = mk.causal_conv3d(x, w, b, pad_mode=pm, backend=backend)
        yr = padded_conv(x.float(), w.float(), b.float(), (1, 1, 1), (1, 1, 1), "causal", pm)
        assert_close(y, yr, scale=2)
        ctx = torch.randn(2, C_in, k[0] - 1, 20, 36, device="cuda", dtype=torch.bfloat16)
        y = mk.causal_conv3d(x, w, b, context=ctx if k[0] > 1 else None, backend=backend)
        yr = padded_conv(x.float(), w.float(), b.float(), (1, 1, 1), (1, 1, 1), "causal", "zeros", ctx.float() if k[0] > 1 else None)
        assert_close(y, yr, scale=2)


def test_gpu_tiles_under_interpreter(monkeypatch):
    """The GPU tile shapes (128-row blocks, several N blocks, K loops over channels,
    split-K dw) through the interpreter: masks and loop bounds as the H100 runs them."""
    from mugv_kernels.ops import conv3d

    monkeypatch.setattr(conv3d, "SMALL_TILES", False)
    dtype = torch.bfloat16  # the shipped 128 x 128 x 64 tiles
    x = torch.randn(1, 72, 3, 6, 8).to(dtype).contiguous(memory_format=CL).requires_grad_()
    w = (torch.randn(136, 72, 2, 1, 1) / 8).to(dtype).requires_grad_()
    b = torch.randn(136).to(dtype).requires_grad_()
    y = mk.causal_conv3d(x, w, b, pad_mode="replicate")
    leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]
    yr = padded_conv(*leaves, (1, 1, 1), (1, 1, 1), "causal", "replicate")
    assert_close(y, yr, scale=4)
    dy = torch.randn_like(yr)
    for g, r in zip(torch.autograd.grad(y, (x, w, b), dy.to(dtype)), torch.autograd.grad(yr, leaves, dy)):
        assert_close(g, r, scale=8)
    # split-K of dw: one tile of channels, 1024 positions -> 4 splits
    x = torch.randn(1, 4, 4, 16, 16, requires_grad=True)
    w = torch.randn(4, 4, 1, 1, 1, requires_grad=True)
    y = mk.causal_conv3d(x, w)
    (gw,) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert conv3d.dw_splits(1024, 1, 32, x.device)[0] == 4
    (rw,) = torch.autograd.grad(F.conv3d(x, w), w, torch.ones_like(y))
    assert_close(gw, rw, scale=8)


def test_cuda_weight_layout():
    """The ``"cuda"`` backend's weight layout: ``[C_out, kT, kH, kW, C_in]``, element by element."""
    from mugv_kernels.ops.conv3d import cuda_weight_layout

    w = torch.randn(4, 3, 2, 3, 5, dtype=torch.float64)
    wl = cuda_weight_layout(w, torch.float32)
    assert wl.shape == (4, 2, 3, 5, 3) and wl.is_contiguous() and wl.dtype == torch.float32
    co, ci, kt, kh, kw = 3, 1, 1, 2, 4
    assert wl[co, kt, kh, kw, ci] == w[co, ci, kt, kh, kw].float()
    assert torch.equal(wl, w.float().permute(0, 2, 3, 4, 1))


def test_weight_layout_cache_reuses_until_the_weight_changes():
    """One re-layout per weight version: hits while nothing changed; a new copy after an
    in-place update, for another dtype, or for another tensor; freed weights leave the cache."""
    from mugv_kernels.ops.conv3d import WeightLayoutCache, cuda_weight_layout

    calls = []

    def layout(weight, dtype):
        calls.append(dtype)
        return cuda_weight_layout(weight, dtype)

    cache = WeightLayoutCache(layout)
    w = torch.nn.Parameter(torch.randn(2, 3, 3, 1, 1))
    first = cache.get(w, torch.bfloat16)
    assert cache.get(w, torch.bfloat16) is first and len(calls) == 1
    with torch.no_grad():
        w.mul_(2)  # an optimizer step: the version counter moves
    second = cache.get(w, torch.bfloat16)
    assert len(calls) == 2 and second is not first
    assert torch.equal(second, cuda_weight_layout(w, torch.bfloat16))
    assert cache.get(w, torch.float16).dtype == torch.float16 and len(calls) == 3
    other = torch.randn(2, 3, 3, 1, 1)
    assert torch.equal(cache.get(other, torch.float16), cuda_weight_layout(other, torch.float16))
    assert len(calls) == 4 and len(cache) == 2
    del other
    assert len(cache) == 1  # the freed weight's entry went with it
    with torch.inference_mode():
        frozen = torch.randn(2, 3, 3, 1, 1)
    cache.get(frozen, torch.float16)
    cache.get(frozen, torch.float16)
    assert len(calls) == 6 and len(cache) == 1  # inference tensors have no version: never cached
