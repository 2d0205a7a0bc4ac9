"""Every public op against its reference on CUDA, in fp32, bf16 and fp16, forward and
gradients, with the compiled kernels (and the ``csrc/`` backends where built).

The rule for low precision is flash-attn's: the kernel's error against the fp32
reference is at most twice that of the same-dtype reference (plus one ulp); fp32 uses the
fp32 tolerance (widened for long reductions). The ``test_sanitize_*`` cases are the small
selection ``benchmarks.gpu_check`` runs under ``compute-sanitizer``. Every test here skips
without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import mugv_kernels as mk
from mugv_kernels.reference.ada_norm import ada_norm_chain
from mugv_kernels.reference.varlen_attention import varlen_attention_ref
from mugv_kernels.reference.conv3d import causal_conv3d_ref
from mugv_kernels.reference.group_norm import group_norm_silu_ref
from mugv_kernels.reference.rope import qk_norm_rope3d_ref
from tests.helpers import assert_close, assert_close_to_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in ts]


def _compare(run, ref, inputs, *, factor=2.0, grad_scale=4.0):
    """Outputs and gradients of ``run(*inputs)`` against ``ref`` at the inputs' dtype and in fp32."""
    a = _leaves(*inputs)
    lo = _leaves(*inputs)
    hi = _leaves(*(t.float() if t is not None and t.is_floating_point() else t for t in inputs))
    outs = [o for o in run(*a) if o is not None]
    outs_lo = [o for o in ref(*lo) if o is not None]
    outs_hi = [o for o in ref(*hi) if o is not None]
    for o, l, h in zip(outs, outs_lo, outs_hi, strict=True):
        assert o.dtype == l.dtype and o.shape == h.shape
        assert_close_to_ref(o, l, h, factor=factor)
    gs = [torch.randn_like(h) for h in outs_hi]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(gs, outs)])
    torch.autograd.backward(outs_lo, [g.to(o.dtype) for g, o in zip(gs, outs_lo)])
    torch.autograd.backward(outs_hi, gs)
    for x, l, h in zip(a, lo, hi):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            if x.dtype == torch.float32:
                assert_close(x.grad, h.grad, scale=grad_scale * 50)
            else:
                assert_close_to_ref(x.grad, l.grad, h.grad, factor=factor * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("G", [1, 2], ids=["t2v", "i2v"])
def test_adaln_family(dtype, G):
    B, N, C = 2, 131, 1152
    dev = "cuda"
    x, res = (torch.randn(B, N, C, device=dev, dtype=dtype) for _ in range(2))
    mod = (B, G, C) if G > 1 else (B, C)
    gate, shift, scale = (0.5 * torch.randn(*mod, device=dev, dtype=dtype) for _ in range(3))
    w, b = 1 + 0.1 * torch.randn(C, device=dev, dtype=dtype), 0.1 * torch.randn(C, device=dev, dtype=dtype)
    index = (torch.rand(B, N, device=dev) < 0.3).int() if G > 1 else None

    def chain(res, x, g, sh, sc, w, b):
        return mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=index, weight=w, bias=b)

    def chain_ref(res, x, g, sh, sc, w, b):
        return ada_norm_chain(x, res, g, sh, sc, index, w, b)

    _compare(chain, chain_ref, (res, x, gate, shift, scale, w, b))
    _compare(lambda x, sh, sc: (mk.ada_layer_norm(x, sh, sc, index=index),),
             lambda x, sh, sc: (ada_norm_chain(x, None, None, sh, sc, index)[1],), (x, shift, scale))  # fmt: skip
    _compare(lambda r, x, g: (mk.gated_residual(r, x, g, index=index),),
             lambda r, x, g: (ada_norm_chain(x, r, g, index=index, do_norm=False)[0],), (res, x, gate))  # fmt: skip
    _compare(lambda x, w: (mk.ada_layer_norm(x, None, None, weight=w, norm="rms"),),
             lambda x, w: (ada_norm_chain(x, None, weight=w, rms=True)[1],), (x, w))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_qk_norm_rope3d_and_rope3d(dtype, interleaved):
    H, D, sections = 48, 72, (24, 24, 24)
    pos = mk.video_positions(2, 9, 16, device="cuda")
    N = pos.shape[0]
    qkv = torch.randn(1, N, 3, H, D, device="cuda", dtype=dtype)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # strided slices, as the model passes them
    qw, kw = (1 + 0.1 * torch.randn(2, D, device="cuda", dtype=dtype)).unbind(0)

    def run(q, k, qw, kw):
        return mk.qk_norm_rope3d(q, k, pos, sections, q_weight=qw, k_weight=kw, interleaved=interleaved)

    def ref(q, k, qw, kw):
        return (qk_norm_rope3d_ref(q, pos, sections, qw, interleaved=interleaved),
                qk_norm_rope3d_ref(k, pos, sections, kw, interleaved=interleaved))  # fmt: skip

    _compare(run, ref, (q, k, qw, kw))
    _compare(lambda x: (mk.rope3d(x, pos, (24, 24, 20), interleaved=interleaved),),
             lambda x: (qk_norm_rope3d_ref(x, pos, (24, 24, 20), interleaved=interleaved),), (q,))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl"])
def test_group_norm_silu(dtype, backend, cl):
    from mugv_kernels._registry import cuda_extension

    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("mugv_kernels._C not built (install with nvcc on PATH)")
    x = 2 * torch.randn(2, 64, 5, 18, 33, device="cuda", dtype=dtype) + 1
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.rand(64, device="cuda", dtype=dtype) + 0.5, torch.randn(64, device="cuda", dtype=dtype)
    if backend == "cuda":  # forward only (the backward is the Triton one)
        with torch.no_grad():
            y = mk.group_norm_silu(x, 32, w, b, backend="cuda")
        assert_close_to_ref(y, group_norm_silu_ref(x, 32, w, b), group_norm_silu_ref(x.float(), 32, w.float(), b.float()))
        return
    _compare(lambda x, w, b: (mk.group_norm_silu(x, 32, w, b, backend=backend),),
             lambda x, w, b: (group_norm_silu_ref(x, 32, w, b),), (x, w, b))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_causal_conv3d(dtype, backend):
    from mugv_kernels._registry import cuda_extension

    if backend == "cuda" and (cuda_extension() is None or dtype == torch.float32):
        pytest.skip("the CUDA conv is bf16/fp16 and needs mugv_kernels._C")
    x = torch.randn(1, 48, 6, 20, 36, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(40, 48, 3, 3, 3, device="cuda") / (48 * 27) ** 0.5).to(dtype)
    b = torch.randn(40, device="cuda", dtype=dtype)
    if backend == "cuda":
        with torch.no_grad():
            y = mk.causal_conv3d(x, w, b, backend="cuda")
        assert_close_to_ref(y, causal_conv3d_ref(x, w, b), causal_conv3d_ref(x.float(), w.float(), b.float()))
        return
    _compare(lambda x, w, b: (mk.causal_conv3d(x, w, b, pad_mode="replicate", backend=backend),),
             lambda x, w, b: (causal_conv3d_ref(x, w, b, pad_mode="replicate"),), (x, w, b))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_varlen_attention_every_backend(dtype):
    lens_q, lens_k, H, D = [130, 0, 1, 257], [70, 5, 0, 129], 2, 72
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(sum(lens_q), H, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lens_k), H, D, device="cuda", dtype=dtype) for _ in range(2))
    avail = mk.varlen_attention_backends("cuda", dtype, D, requires_grad=True)
    ran = []
    scale = 50.0 if dtype == torch.float32 else 1.0  # fp32 dots may run as TF32
    for backend in [n for n, why in avail.items() if why is None and n != "reference"]:
        # the kernels round P to the input dtype before PV: the per-dtype tolerance, not
        # the 2x-of-reference rule (the reference rounds once, at the end)
        a = _leaves(q, k, v)
        h = _leaves(q.float(), k.float(), v.float())
        out = mk.varlen_attention(*a, cu_q, cu_k, max(lens_q), max(lens_k), backend=backend)
        ref = varlen_attention_ref(*h, cu_q, cu_k)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, scale=scale)
        dout = torch.randn_like(ref)
        out.backward(dout.to(dtype))
        ref.backward(dout)
        for x, y in zip(a, h):
            assert_close(x.grad, y.grad, dtype, scale=2 * scale)
        ran.append(backend)
    if dtype != torch.float32:
        assert "triton" in ran, avail


def test_pack_unpack_roundtrip():
    parts = [torch.randn(n, 3, 8, device="cuda", dtype=torch.bfloat16) for n in (5, 0, 17)]
    packed, cu, max_seqlen = mk.pack(parts)
    assert packed.is_cuda and max_seqlen == 17 and cu.tolist() == [0, 5, 5, 22]
    for a, b in zip(mk.unpack(packed, cu), parts):
        assert torch.equal(a, b)


# ------------------------------------------------ the compute-sanitizer selection (small, quick)


def test_sanitize_adaln():
    x, res = (torch.randn(1, 67, 3456, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g, sh, sc = (torch.randn(1, 2, 3456, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    idx = (torch.arange(67, device="cuda") % 2).int()[None]
    r, o = mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=idx)
    (r.float().sum() + o.float().sum()).backward()
    torch.cuda.synchronize()


def test_sanitize_rope():
    pos = mk.video_positions(1, 3, 5, device="cuda")
    q, k = (torch.randn(pos.shape[0], 48, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.ones(72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    qo, ko = mk.qk_norm_rope3d(q, k, pos, (24, 24, 24), q_weight=w, k_weight=w)
    (qo.float().sum() + ko.float().sum()).backward()
    torch.cuda.synchronize()


def test_sanitize_shared_memory_kernels():
    """The kernels that stage tiles in shared memory (tl.dot): conv3d and attention."""
    x = torch.randn(1, 32, 3, 10, 12, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 32, 3, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mk.causal_conv3d(x, w).float().sum().backward()
    q, k, v = (torch.randn(100, 2, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 37, 100], device="cuda", dtype=torch.int32)
    mk.varlen_attention(q, k, v, cu, cu, 63, 63, backend="triton").float().sum().backward()
    y = mk.group_norm_silu(x.detach(), 8)
    assert y.shape == x.shape
    torch.cuda.synchronize()
