"""QK-RMSNorm + 3D RoPE family: the Triton kernels (under the interpreter without a GPU)
against the reference and against an independent re-derivation of the public MUG-V
formulation (complex multiplication with a precomputed table), plus layouts, odd and
empty shapes, strided inputs, opcheck, compile, gradcheck and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import assert_close, assert_close_to_ref

import mugv_kernels as mk
from mugv_kernels._registry import capture_launches
from mugv_kernels.nn import QKNormRoPE3D
from mugv_kernels.reference.rope import qk_norm_rope3d_ref, rope3d_bwd_ref, rope3d_fwd_ref, video_positions_ref

MUGV = (72, (24, 24, 24))  # MUG-V head_dim and (h, w, t) sections
WAN = (128, (44, 42, 42))  # Wan-style uneven split
PASS = (20, (6, 4, 2))  # 8 trailing dims pass through unrotated


# ----------------------------------------------------------------------------------------
# Independent formulations, written from the public code rather than from our reference
# ----------------------------------------------------------------------------------------


def public_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MUG-V's ``RMSNorm.forward`` (``mug_v/dit/module.py``), in fp32 throughout."""
    xf = x.float()
    return weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def complex_table(positions: torch.Tensor, sections, theta: float = 10000.0) -> torch.Tensor:
    """``[..., sum(sections)/2]`` complex64 table: per section ``polar(1, pos * freqs)`` with
    ``freqs = 1 / theta ** (arange(0, d, 2) / d)``, sections concatenated in column order
    (``precompute_freqs_cis_for_3drope`` + ``get_freq_cis``, generalized to any split)."""
    parts = []
    for i, d in enumerate(sections):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
        ang = positions[..., i].float()[..., None] * freqs
        parts.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(parts, -1)


def public_rope(x: torch.Tensor, positions: torch.Tensor, sections, interleaved: bool) -> torch.Tensor:
    """RoPE of ``x [..., H, D]`` (fp32): interleaved as MUG-V's ``apply_rotary_emb``
    (``view_as_complex`` of adjacent pairs times the table); rotate-half as GPT-NeoX/HF
    (``x * cos + rotate_half(x) * sin`` per section). Dims past the sections pass through."""
    x = x.float()
    r = sum(sections)
    fc = complex_table(positions, sections)[..., None, :]  # broadcast over heads
    if interleaved:
        xc = torch.view_as_complex(x[..., :r].reshape(*x.shape[:-1], -1, 2).contiguous())
        rot = torch.view_as_real(xc * fc).flatten(-2)
    else:
        out, col = [], 0
        for i, d in enumerate(sections):
            seg = x[..., col : col + d]
            ang = torch.angle(fc[..., col // 2 : (col + d) // 2])
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
            half = torch.cat([-seg[..., d // 2 :], seg[..., : d // 2]], -1)
            out.append(seg * cos + half * sin)
            col += d
        rot = torch.cat(out, -1)
    return torch.cat([rot, x[..., r:]], -1)


def _positions(shape, hi=17):
    return torch.randint(0, hi, (*shape, 3))


def _leaves(*ts, keep_strides=False):
    """Fresh autograd leaves; ``keep_strides`` keeps views (e.g. qkv slices) as they are."""
    return [
        (t.detach() if keep_strides else t.detach().clone()).requires_grad_(True) if t is not None else None
        for t in ts
    ]


# ----------------------------------------------------------------------------------------
# video_positions
# ----------------------------------------------------------------------------------------


def _positions_by_loops(T, H, W):
    """MUG-V token positions in (h, w, t) columns, written out token by token."""
    rows = [[0, 0, 0]]
    for t in range(T):
        for h in range(H):
            for w in range(W):
                rows.append([h, w, t + 1])
    rows.append([H - 1, W - 1, T + 1])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("T,H,W", [(1, 1, 1), (2, 2, 3), (3, 4, 2)])
def test_video_positions_exact(T, H, W):
    got = mk.video_positions(T, H, W)
    expected = _positions_by_loops(T, H, W)
    assert got.dtype == torch.int32 and got.shape == (T * H * W + 2, 3)
    assert torch.equal(got, expected)
    assert torch.equal(got.long(), video_positions_ref(T, H, W))  # the public table's grid picks
    # other column orders and options
    thw = mk.video_positions(T, H, W, order=("t", "h", "w"), dtype=torch.int64)
    assert thw.dtype == torch.int64 and torch.equal(thw, expected[:, [2, 0, 1]].long())
    plain = mk.video_positions(T, H, W, start_end_tokens=False)
    assert torch.equal(plain, expected[1:-1] - torch.tensor([0, 0, 1], dtype=torch.int32))
    assert torch.equal(mk.video_positions(T, H, W, start_end_tokens=False, t_offset=1), expected[1:-1])


def test_video_positions_mugv_example():
    # 2 frames of a 2 x 3 grid: start, frame 1 (t=1) row-major, frame 2 (t=2), end (h=1, w=2, t=3)
    pos = mk.video_positions(2, 2, 3)
    assert pos[0].tolist() == [0, 0, 0]
    assert pos[1:7].tolist() == [[0, 0, 1], [0, 1, 1], [0, 2, 1], [1, 0, 1], [1, 1, 1], [1, 2, 1]]
    assert pos[-1].tolist() == [1, 2, 3]
    assert mk.video_positions(0, 4, 4).shape == (0, 3)


@pytest.mark.parametrize(
    "kwargs",
    [dict(T=-1, H=2, W=2), dict(T=1, H=2, W=2, order=("t", "h", "h")), dict(T=1, H=1, W=1, t_offset=-1)],
)
def test_video_positions_errors(kwargs):
    with pytest.raises(ValueError):
        mk.video_positions(**kwargs)


# ----------------------------------------------------------------------------------------
# Forward and backward against the reference
# ----------------------------------------------------------------------------------------

# (layout, B, N, H, (D, sections), interleaved, dtype, norm): N odd, 1; H not a multiple of
# the head block (4); MUG-V, Wan-style and pass-through head dims; both pair layouts.
CASES = [
    ("padded", 2, 5, 3, MUGV, True, torch.float32, "both"),
    ("padded", 1, 7, 6, WAN, False, torch.bfloat16, "both"),
    ("packed", 1, 9, 2, MUGV, False, torch.bfloat16, "both"),
    ("packed", 1, 11, 5, WAN, True, torch.float32, "q_only"),
    ("padded", 3, 1, 2, PASS, True, torch.bfloat16, "none"),
    ("packed", 1, 3, 4, PASS, False, torch.float32, "both"),
    ("padded", 2, 3, 1, MUGV, True, torch.float16, "both"),
]


def _case_inputs(layout, B, N, H, D, dtype, norm, *, fused_qkv=True):
    shape = (B, N, H, D) if layout == "padded" else (N, H, D)
    if fused_qkv:  # as the model calls it: q and k are slices of a fused projection
        qkv = torch.randn(*shape[:-2], 3, H, D, dtype=dtype)
        q, k = qkv.select(-3, 0), qkv.select(-3, 1)
    else:
        q, k = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    pos = _positions(shape[:-2])
    qw = (1 + 0.5 * torch.randn(D)).to(dtype) if norm in ("both", "q_only") else None
    kw = (1 + 0.5 * torch.randn(D)).to(dtype) if norm == "both" else None
    return q, k, pos, qw, kw


@pytest.mark.parametrize("layout,B,N,H,dsec,interleaved,dtype,norm", CASES)
def test_fwd_bwd_matches_reference(layout, B, N, H, dsec, interleaved, dtype, norm):
    D, sections = dsec
    q, k, pos, qw, kw = _case_inputs(layout, B, N, H, D, dtype, norm)

    def fused(q, k, qw, kw):
        return mk.qk_norm_rope3d(q, k, pos, sections, q_weight=qw, k_weight=kw, interleaved=interleaved)

    def ref(q, k, qw, kw):
        return (
            qk_norm_rope3d_ref(q, pos, sections, qw, interleaved=interleaved),
            qk_norm_rope3d_ref(k, pos, sections, kw, interleaved=interleaved),
        )

    inputs = (q, k, qw, kw)
    got, lowp = _leaves(*inputs, keep_strides=True), _leaves(*inputs)
    assert not got[0].is_contiguous() and got[0].stride(-1) == 1  # qkv slices reach the op
    fp32 = _leaves(*[t.float() if t is not None else None for t in inputs])
    outs = fused(*got)
    outs_lowp, outs32 = ref(*lowp), ref(*fp32)
    for o, o_lowp, o32 in zip(outs, outs_lowp, outs32):
        assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
        assert_close_to_ref(o, o_lowp, o32)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(outs_lowp, grads)
    torch.autograd.backward(outs32, [g.float() for g in grads])
    for t, t_lowp, t32 in zip(got, lowp, fp32):
        if t is None:
            continue
        assert t.grad.dtype == t.dtype
        # weight grads sum over every token and head: widen with the reduced length
        scale = math.sqrt(q[..., 0].numel()) if t.dim() == 1 else 1.0
        if dtype == torch.float32:
            assert_close(t.grad, t32.grad, scale=scale)
        else:
            assert_close_to_ref(t.grad, t_lowp.grad, t32.grad, factor=2.0 * scale)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope3d_matches_reference(interleaved):
    D, sections = WAN
    x = torch.randn(2, 3, 3, D + 8)[..., :D]  # rows strided by D + 8
    pos = _positions((3,))  # [N, 3] shared by the batch
    (xg,) = _leaves(x, keep_strides=True)
    out = mk.rope3d(xg, pos, sections, interleaved=interleaved)
    assert_close(out, qk_norm_rope3d_ref(x, pos, sections, interleaved=interleaved))
    g = torch.randn_like(out)
    out.backward(g)
    # the rotation is orthogonal: its gradient is the inverse rotation (turn by -angle)
    assert_close(xg.grad, qk_norm_rope3d_ref(g, -pos, sections, interleaved=interleaved))
    assert_close(xg.grad, rope3d_bwd_ref(g, None, x, None, pos, None, None, sections, 1e-6, 1e4, interleaved)[0])


# ----------------------------------------------------------------------------------------
# Against the public MUG-V formulation (complex table), written independently
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dsec,interleaved", [(MUGV, True), (WAN, True), (WAN, False), (PASS, False)])
def test_matches_public_formulation(dsec, interleaved):
    D, sections = dsec
    T, Hh, Ww, heads = 2, 2, 3, 2
    pos = mk.video_positions(T, Hh, Ww)  # [N, 3], MUG-V token order
    N = pos.shape[0]
    q, k = torch.randn(2, N, heads, D), torch.randn(2, N, heads, D)
    qw, kw = 1 + 0.5 * torch.randn(D), 1 + 0.5 * torch.randn(D)
    q_out, k_out = mk.qk_norm_rope3d(q, k, pos, sections, q_weight=qw, k_weight=kw, interleaved=interleaved)
    pos_b = pos.expand(2, N, 3)
    assert_close(q_out, public_rope(public_rms_norm(q, qw), pos_b, sections, interleaved), scale=4)
    assert_close(k_out, public_rope(public_rms_norm(k, kw), pos_b, sections, interleaved), scale=4)


def test_large_positions_match_public_table():
    """MUG-V tables reach position 479 (time) / 383 (space): angles to ~480 rad in fp32."""
    D, sections = MUGV
    pos = torch.stack([torch.randint(0, 384, (8,)), torch.randint(0, 384, (8,)), torch.randint(400, 480, (8,))], -1)
    x = torch.randn(8, 2, D)
    got = mk.rope3d(x, pos, sections)
    exact = public_rope(x.double(), pos, sections, True)  # table in fp32, as the public code
    # fp32 angles at ~480 rad carry ~3e-5 rad of rounding whoever computes them
    torch.testing.assert_close(got.double(), exact.double(), atol=2e-4 * x.abs().max().item(), rtol=0)


# ----------------------------------------------------------------------------------------
# Layouts, strides, shapes
# ----------------------------------------------------------------------------------------


def test_packed_equals_padded():
    D, sections = MUGV
    q, k = torch.randn(2, 3, 2, D), torch.randn(2, 3, 2, D)
    pos = _positions((2, 3))
    w = torch.randn(D)
    padded = mk.qk_norm_rope3d(q, k, pos, sections, q_weight=w, k_weight=w)
    packed = mk.qk_norm_rope3d(q.flatten(0, 1), k.flatten(0, 1), pos.flatten(0, 1), sections, q_weight=w, k_weight=w)
    for a, b in zip(padded, packed):
        assert torch.equal(a.flatten(0, 1), b)


def test_strided_inputs_launch_without_copies():
    """q/k slices of a fused [B, N, 3, H, D] projection reach the kernel as they are."""
    D, sections = MUGV
    qkv = torch.randn(2, 5, 3, 4, D)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    pos = _positions((5,)).t().contiguous().t()  # [N, 3] with column stride N
    w = torch.randn(D)
    with capture_launches() as records:
        mk.qk_norm_rope3d(q, k, pos, sections, q_weight=w, k_weight=w)
    (rec,) = records
    assert rec.args[0].data_ptr() == q.data_ptr() and rec.args[0].stride() == q.stride()
    assert rec.args[1].data_ptr() == k.data_ptr() and rec.args[2].data_ptr() == pos.data_ptr()
    out = mk.qk_norm_rope3d(q, k, pos, sections, q_weight=w, k_weight=w)
    assert_close(out[0], qk_norm_rope3d_ref(q, pos, sections, w))
    # a layout without unit stride on D is copied once and still correct
    q_t = torch.randn(2, 5, D, 4).transpose(-1, -2)
    assert_close(mk.rope3d(q_t, pos, sections), qk_norm_rope3d_ref(q_t, pos, sections))


@pytest.mark.parametrize("shape", [(2, 0, 3, 72), (0, 3, 72), (1, 4, 0, 72)])
def test_empty(shape):
    D = shape[-1]
    q = torch.randn(shape, requires_grad=True)
    k = torch.randn(shape, requires_grad=True)
    w = torch.ones(D, requires_grad=True)
    pos = torch.zeros(*shape[:-2], 3, dtype=torch.int64)
    q_out, k_out = mk.qk_norm_rope3d(q, k, pos, (24, 24, 24), q_weight=w, k_weight=w)
    assert q_out.shape == shape and k_out.shape == shape
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.shape == shape and torch.equal(w.grad, torch.zeros(D))


def test_one_output_unused_and_deterministic_weight_grads():
    D, sections = WAN
    q, k = torch.randn(1, 6, 3, D), torch.randn(1, 6, 3, D)
    pos = _positions((1, 6))
    qw, kw = _leaves(torch.randn(D), torch.randn(D))
    grads = []
    for _ in range(2):
        qw.grad = kw.grad = None
        q_out, _ = mk.qk_norm_rope3d(q, k, pos, sections, q_weight=qw, k_weight=kw)
        q_out.sum().backward()  # k_out unused: its gradient counts as zero
        grads.append((qw.grad.clone(), kw.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[1][1], torch.zeros(D))
    ref_qw = _leaves(qw)[0]
    qk_norm_rope3d_ref(q, pos, sections, ref_qw).sum().backward()
    assert_close(qw.grad, ref_qw.grad, scale=4)


def test_empty_section_and_unused_q_output():
    """A zero-size section (column 0 unused) and a backward where only k_out is used."""
    D, sections = 16, (0, 8, 4)
    q, k = _leaves(torch.randn(5, 3, D), torch.randn(5, 3, D))
    kw = torch.randn(D, requires_grad=True)
    pos = _positions((5,))
    pos[:, 0] = 1000  # drives no dims
    q_out, k_out = mk.qk_norm_rope3d(q, k, pos, sections, k_weight=kw, interleaved=False)
    assert_close(q_out, qk_norm_rope3d_ref(q, pos, sections, interleaved=False))
    assert torch.equal(q_out[..., 12:], q[..., 12:].detach())  # past the sections: unrotated
    k_out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    k2, kw2 = _leaves(k, kw)
    qk_norm_rope3d_ref(k2, pos, sections, kw2, interleaved=False).sum().backward()
    assert_close(k.grad, k2.grad)
    assert_close(kw.grad, kw2.grad, scale=4)


def test_gpu_tiling_under_interpreter(monkeypatch):
    """The GPU launch choice (one token per tile, 512 // BLOCK_D heads) and a backward
    split over several programs with a ragged last chunk, run by the interpreter."""
    from mugv_kernels.ops import rope as rope_ops

    gpu_config = rope_ops.launch_config
    monkeypatch.setattr(rope_ops, "launch_config", lambda H, D, device, **kw: gpu_config(H, D, torch.device("meta"), **kw))
    monkeypatch.setattr(rope_ops, "bwd_programs", lambda n, block_t, device: (3, 2))  # 2 + 2 + 1 tokens
    assert rope_ops.launch_config(6, 72, torch.device("cpu")).block_t == 1
    D, sections = MUGV
    q, k, pos, qw, kw = _case_inputs("packed", 1, 5, 6, D, torch.float32, "both")
    leaves = _leaves(q, k, qw, kw, keep_strides=True)
    refs = _leaves(q, k, qw, kw)
    outs = mk.qk_norm_rope3d(leaves[0], leaves[1], pos, sections, q_weight=leaves[2], k_weight=leaves[3])
    outs_ref = [qk_norm_rope3d_ref(refs[i], pos, sections, refs[i + 2]) for i in (0, 1)]
    for o, r in zip(outs, outs_ref):
        assert_close(o, r)
    g = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, g)
    torch.autograd.backward(outs_ref, g)
    for t, r in zip(leaves, refs):
        assert_close(t.grad, r.grad, scale=4)


# ----------------------------------------------------------------------------------------
# torch.library / compile / gradcheck / module
# ----------------------------------------------------------------------------------------


def test_opcheck():
    D, sections = PASS
    q, k = torch.randn(1, 2, 1, D, requires_grad=True), torch.randn(1, 2, 1, D, requires_grad=True)
    pos = _positions((1, 2))
    qw, kw = torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)
    torch.library.opcheck(torch.ops.mugv.qk_norm_rope3d_fwd, (q, k, pos, qw, kw, list(sections), 1e-6, 1e4, True))
    rope_only = (q, None, pos, None, None, list(sections), 1e-6, 1e4, False)
    torch.library.opcheck(torch.ops.mugv.qk_norm_rope3d_fwd, rope_only)
    dq, dk = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
    args = (dq, dk, q.detach(), k.detach(), pos, qw.detach(), kw.detach(), list(sections), 1e-6, 1e4, True)
    torch.library.opcheck(torch.ops.mugv.qk_norm_rope3d_bwd, args)


def test_compile_fullgraph():
    D, sections = MUGV
    module = QKNormRoPE3D(D, sections)
    with torch.no_grad():
        module.q_weight.normal_(1, 0.3)
    q, k = _leaves(torch.randn(1, 4, 2, D), torch.randn(1, 4, 2, D))
    pos = _positions((4,))

    def step(q, k):
        q_out, k_out = module(q, k, pos)
        return (q_out * k_out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k)
    loss.backward()
    q2, k2 = _leaves(q, k)
    q_ref = qk_norm_rope3d_ref(q2, pos, sections, module.q_weight)
    loss_ref = (q_ref * qk_norm_rope3d_ref(k2, pos, sections, module.k_weight)).sum()
    loss_ref.backward()
    assert_close(loss, loss_ref, scale=10)
    assert_close(q.grad, q2.grad, scale=4)


def test_gradcheck_fp64():
    D, sections = PASS
    q, k = _leaves(torch.randn(1, 2, 1, D, dtype=torch.float64), torch.randn(2, 1, D, dtype=torch.float64)[None])
    qw, kw = _leaves(torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64))
    pos = _positions((1, 2))
    for interleaved in (True, False):

        def fn(q, k, qw, kw, interleaved=interleaved):
            return mk.qk_norm_rope3d(q, k, pos, sections, q_weight=qw, k_weight=kw, interleaved=interleaved)

        torch.autograd.gradcheck(fn, (q, k, qw, kw))


def test_fp64_reference_matches_public():
    D, sections = MUGV
    x = torch.randn(5, 2, D, dtype=torch.float64)
    pos = _positions((5,))
    out = mk.rope3d(x, pos, sections)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, public_rope(x, pos, sections, True).double(), atol=1e-5, rtol=1e-5)


def test_module():
    m = QKNormRoPE3D(72)
    assert m.sections == (24, 24, 24) and set(dict(m.named_parameters())) == {"q_weight", "k_weight"}
    assert "sections=(24, 24, 24)" in repr(m)
    plain = QKNormRoPE3D(128, (44, 42, 42), interleaved=False, qk_norm=False)
    assert list(plain.parameters()) == []
    x = torch.randn(3, 2, 128)
    pos = _positions((3,))
    q_out, _ = plain(x, x, pos)
    assert_close(q_out, qk_norm_rope3d_ref(x, pos, (44, 42, 42), interleaved=False))
    with pytest.raises(ValueError):
        QKNormRoPE3D(72, (24, 24, 25))


def test_reference_fwd_bwd_helpers_consistent_with_autograd():
    D, sections = WAN
    q, k = _leaves(torch.randn(2, 2, D, dtype=torch.float64), torch.randn(2, 2, D, dtype=torch.float64))
    qw = torch.randn(D, dtype=torch.float64, requires_grad=True)
    pos = _positions((2,))
    q_out, k_out = rope3d_fwd_ref(q, k, pos, qw, None, sections, 1e-6, 1e4, False)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (gq, gk))
    dq, dk, dqw, _ = rope3d_bwd_ref(gq, gk, q.detach(), k.detach(), pos, qw.detach(), None, sections, 1e-6, 1e4, False)
    torch.testing.assert_close(dq, q.grad)
    torch.testing.assert_close(dk, k.grad)
    torch.testing.assert_close(dqw, qw.grad)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------

_Q = torch.randn(1, 4, 2, 72)
_POS = torch.zeros(1, 4, 3, dtype=torch.int64)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((_Q, _Q, _POS, (24, 24, 23)), {}, "even"),
        ((_Q, _Q, _POS, (24, 24, 26)), {}, "sum to at most"),
        ((_Q, _Q, _POS, (24, 24)), {}, "three"),
        ((_Q, _Q, _POS, (24.0, 24, 24)), {}, "three"),
        ((_Q, _Q, _POS, (24, -2, 24)), {}, "non-negative"),
        ((_Q, _Q, _POS, "abc"), {}, "sections"),
        ((_Q, _Q, _POS[..., :2], (24, 24, 24)), {}, "positions must have shape"),
        ((_Q, _Q, _POS[0, :3], (24, 24, 24)), {}, "positions must have shape"),
        ((_Q, _Q, _POS - 1, (24, 24, 24)), {}, "non-negative"),
        ((_Q, _Q, _POS + (1 << 24), (24, 24, 24)), {}, "2\\*\\*24"),
        ((_Q, _Q[:, :3], _POS, (24, 24, 24)), {}, "shape of q"),
        ((_Q, _Q[..., :1, :], _POS, (24, 24, 24)), {}, "shape of q"),
        ((_Q[0, 0], _Q[0, 0], _POS, (24, 24, 24)), {}, "3-D or 4-D"),
        ((_Q, _Q, _POS, (24, 24, 24)), dict(q_weight=torch.ones(71)), "q_weight must have shape"),
        ((_Q, _Q, _POS, (24, 24, 24)), dict(k_weight=torch.ones(72, 1)), "k_weight must be 1-D"),
        ((_Q, _Q, _POS, (24, 24, 24)), dict(eps=0.0), "eps"),
        ((_Q, _Q, _POS, (24, 24, 24)), dict(theta=-1.0), "theta"),
        ((_Q, _Q, _POS, (24, 24, 24)), dict(interleaved="yes"), "interleaved"),
        ((torch.randn(1, 4, 2, 2048), torch.randn(1, 4, 2, 2048), _POS, (24, 24, 24)), {}, "head_dim"),
    ],
)
def test_bad_input_value_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.qk_norm_rope3d(*args, **kwargs)


def test_check_positions_can_be_skipped():
    # the range check is a host sync: a model may check once and skip it in every block
    out = mk.rope3d(_Q, _POS + (1 << 20), (24, 24, 24), check_positions=False)
    assert out.shape == _Q.shape
    with pytest.raises(ValueError, match="non-negative"):
        QKNormRoPE3D(72)(_Q, _Q, _POS - 1)


def test_bad_input_type_errors():
    with pytest.raises(TypeError, match="positions must have dtype int32/int64"):
        mk.qk_norm_rope3d(_Q, _Q, _POS.float(), (24, 24, 24))
    with pytest.raises(TypeError, match="positions must be a torch.Tensor"):
        mk.qk_norm_rope3d(_Q, _Q, [[0, 0, 0]], (24, 24, 24))
    with pytest.raises(TypeError, match="dtype must be int32 or int64"):
        mk.video_positions(1, 1, 1, dtype=torch.float32)
    with pytest.raises(TypeError, match="k dtype"):
        mk.qk_norm_rope3d(_Q, _Q.bfloat16(), _POS, (24, 24, 24))
    with pytest.raises(TypeError):
        mk.qk_norm_rope3d(_Q.long(), _Q.long(), _POS, (24, 24, 24))
    with pytest.raises(TypeError):
        mk.qk_norm_rope3d(_Q, "k", _POS, (24, 24, 24))
    with pytest.raises(ValueError, match="even"):
        mk.rope3d(_Q, _POS, (23, 24, 24))
    with pytest.raises(ValueError, match="positions"):
        mk.rope3d(_Q[0], _POS, (24, 24, 24))  # packed x needs [total, 3]


# ----------------------------------------------------------------------------------------
# RMSNorm across heads (Wan's rms_norm_across_heads) + RoPE
# ----------------------------------------------------------------------------------------


def public_across_heads(x, weight, positions, sections, interleaved, eps=1e-6):
    """Wan's QK norm written as diffusers runs it: ``torch.nn.RMSNorm(H * D)`` on the
    flattened projection, then the heads' RoPE (the complex-table formulation above)."""
    H, D = x.shape[-2:]
    xn = torch.nn.functional.rms_norm(x.float().flatten(-2), (H * D,), weight.float(), eps).view(x.shape)
    return public_rope(xn, positions, sections, interleaved)


ACROSS_CASES = [
    ("padded", 2, 5, 5, (16, (8, 4, 4)), True, torch.float32, True),
    ("packed", 1, 7, 3, WAN, False, torch.float32, True),
    ("padded", 1, 1, 6, (16, (8, 4, 4)), False, torch.bfloat16, True),
    ("padded", 2, 37, 2, PASS, True, torch.float32, False),  # several backward programs; q alone
]


@pytest.mark.parametrize("layout,B,N,H,dsec,interleaved,dtype,with_k", ACROSS_CASES)
def test_across_heads_matches_public(layout, B, N, H, dsec, interleaved, dtype, with_k):
    """Outputs and the q/k/weight gradients against torch's RMSNorm over all heads +
    the complex-table RoPE (fp32), bf16 against the same-dtype reference; heads in
    several blocks (H > 4), N = 1, packed, pass-through dims, and q alone (k=None)."""
    D, sections = dsec
    shape = (B, N, H, D) if layout == "padded" else (N, H, D)
    pos = _positions(shape[:-2])
    q, k = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    qw, kw = (1 + 0.5 * torch.randn(2, H * D)).to(dtype).unbind(0)
    inputs = (q, k, qw, kw) if with_k else (q, qw)
    got, lowp, fp32 = _leaves(*inputs), _leaves(*inputs), _leaves(*[t.float() for t in inputs])
    if with_k:
        outs = mk.qk_norm_rope3d(got[0], got[1], pos, sections, q_weight=got[2], k_weight=got[3],
                                 interleaved=interleaved, across_heads=True)  # fmt: skip
        pairs = ((lowp[0], lowp[2], fp32[0], fp32[2]), (lowp[1], lowp[3], fp32[1], fp32[3]))
    else:
        q_out, none = mk.qk_norm_rope3d(got[0], None, pos, sections, q_weight=got[1], interleaved=interleaved,
                                        across_heads=True)  # fmt: skip
        assert none is None
        outs = (q_out,)
        pairs = ((lowp[0], lowp[1], fp32[0], fp32[1]),)
    refs_lowp = [qk_norm_rope3d_ref(x, pos, sections, w, interleaved=interleaved, across_heads=True)
                 for x, w, _, _ in pairs]  # fmt: skip
    refs32 = [public_across_heads(x, w, pos, sections, interleaved) for _, _, x, w in pairs]
    for o, o_lowp, o32 in zip(outs, refs_lowp, refs32, strict=True):
        assert o.dtype == dtype and o.shape == q.shape
        assert_close_to_ref(o, o_lowp, o32)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs_lowp, grads)
    torch.autograd.backward(refs32, [g.float() for g in grads])
    for t, t_lowp, t32 in zip(got, lowp, fp32, strict=True):
        scale = math.sqrt(B * N) if t.dim() == 1 else 1.0
        if dtype == torch.float32:
            assert_close(t.grad, t32.grad, scale=scale)
        else:
            assert_close_to_ref(t.grad, t_lowp.grad, t32.grad, factor=2.0 * scale)


def test_across_heads_opcheck_gradcheck_and_errors():
    D, sections = PASS
    q, k = torch.randn(1, 3, 2, D, requires_grad=True), torch.randn(1, 3, 2, D, requires_grad=True)
    pos = _positions((1, 3))
    qw, kw = torch.randn(2 * D, requires_grad=True), torch.randn(2 * D, requires_grad=True)
    args = (q, k, pos, qw, kw, list(sections), 1e-6, 1e4, True, True)
    torch.library.opcheck(torch.ops.mugv.qk_norm_rope3d_fwd, args)  # its autograd runs the backward op
    x, w = _leaves(torch.randn(2, 3, D, dtype=torch.float64), torch.randn(3 * D, dtype=torch.float64))
    pos2 = _positions((2,))
    torch.autograd.gradcheck(
        lambda x, w: mk.qk_norm_rope3d(x, None, pos2, sections, q_weight=w, across_heads=True)[0], (x, w)
    )
    with pytest.raises(ValueError, match=r"heads \* head_dim"):
        mk.qk_norm_rope3d(q, k, pos, sections, q_weight=torch.ones(D), k_weight=torch.ones(D), across_heads=True)
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        mk.qk_norm_rope3d(q, k, pos, sections, q_weight=torch.ones(2 * D), across_heads=True)
    with pytest.raises(ValueError, match="across_heads must be a bool"):
        mk.qk_norm_rope3d(q, k, pos, sections, across_heads=1)
    with pytest.raises(ValueError, match="k_weight needs k"):
        mk.qk_norm_rope3d(q, None, pos, sections, k_weight=torch.ones(D))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_wan_across_heads():
    """The compiled across-heads kernels at a Wan-like shape (40 heads x 128, bf16)."""
    D, sections = WAN
    q, k = torch.randn(2, 2, 1500, 40, D, device="cuda", dtype=torch.bfloat16).unbind(0)
    pos = mk.video_positions(3, 20, 25, start_end_tokens=False, order=("t", "h", "w"), device="cuda")
    qw, kw = (1 + 0.1 * torch.randn(2, 40 * D, device="cuda")).unbind(0)
    leaves = _leaves(q[None], k[None], qw, kw)
    outs = mk.qk_norm_rope3d(*leaves[:2], pos, sections, q_weight=leaves[2], k_weight=leaves[3], across_heads=True)
    r = _leaves(q[None].float(), k[None].float(), qw, kw)
    refs = [qk_norm_rope3d_ref(r[i], pos, sections, r[i + 2], across_heads=True) for i in (0, 1)]
    for o, ref in zip(outs, refs):
        assert_close(o, ref, dtype=torch.bfloat16)
    g = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, g)
    torch.autograd.backward(refs, [x.float() for x in g])
    assert_close(leaves[0].grad, r[0].grad, dtype=torch.bfloat16)
    assert_close(leaves[2].grad, r[2].grad, dtype=torch.bfloat16, scale=50)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("interleaved", [True, False])
def test_cuda_mugv_shape(interleaved):
    """The compiled kernels at a MUG-V-like shape (bf16, strided qkv slices)."""
    D, sections = MUGV
    qkv = torch.randn(2, 1802, 3, 48, D, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    pos = mk.video_positions(2, 30, 30, device="cuda")
    qw, kw = (1 + 0.1 * torch.randn(2, D, device="cuda")).unbind(0)
    q_l, k_l, qw_l, kw_l = _leaves(q, k, qw, kw)
    outs = mk.qk_norm_rope3d(q_l, k_l, pos, sections, q_weight=qw_l, k_weight=kw_l, interleaved=interleaved)
    r = _leaves(q.float(), k.float(), qw, kw)
    refs = (
        qk_norm_rope3d_ref(r[0], pos, sections, r[2], interleaved=interleaved),
        qk_norm_rope3d_ref(r[1], pos, sections, r[3], interleaved=interleaved),
    )
    for o, ref in zip(outs, refs):
        assert_close(o, ref, dtype=torch.bfloat16)
    g = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, g)
    torch.autograd.backward(refs, [x.float() for x in g])
    assert_close(q_l.grad, r[0].grad, dtype=torch.bfloat16)
    assert_close(qw_l.grad, r[2].grad, dtype=torch.bfloat16, scale=50)
