"""varlen_attention: every backend available here against per-sample SDPA and the
reference (forward and gradients), edge segments, backend selection, argument errors,
the FlexAttention document mask, compile, and the nn modules."""

import math

import pytest
import torch
import torch.nn.functional as F

import mugv_kernels as mk
from tests.helpers import assert_close
from mugv_kernels.nn import VarlenAttention, VarlenCrossAttention, VarlenSelfAttention
from mugv_kernels.ops.varlen_attention import document_block_mask, select_varlen_backend
from mugv_kernels.ops.varlen_attention_triton import MAX_SEGMENTS, attn_launch_config, head_dim_split, varlen_flash_attention
from mugv_kernels.reference.varlen_attention import varlen_attention_bwd_ref, varlen_attention_fwd_ref, varlen_attention_ref

# Segment lengths: empty query segment with keys, a length-1 segment without keys, a
# length-1 key segment, odd lengths. Self-attention uses Q_LENS for both.
Q_LENS = [5, 0, 1, 17, 3]
K_LENS = [7, 3, 0, 1, 9]
H = 3


def make(lengths, head_dim, dtype, heads=H):
    """Per-sample ``[N_b, heads, D]`` tensors."""
    return [torch.randn(n, heads, head_dim, dtype=dtype) for n in lengths]


def per_sample_sdpa(qs, ks, vs):
    """Ground truth built independently of the package: ``F.scaled_dot_product_attention``
    on each sample in fp32 (math backend), zeros where a sample has no keys."""
    outs = []
    for q, k, v in zip(qs, ks, vs):
        if k.shape[0] == 0:
            outs.append(q.float() * 0)
            continue
        o = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v)))
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def cpu_backends(requires_grad):
    """Backends that run on CPU here; the Triton interpreter gets its own, smaller matrix."""
    avail = mk.varlen_attention_backends("cpu", requires_grad=requires_grad)
    return [n for n, why in avail.items() if why is None and n != "triton"]


TRITON = mk.varlen_attention_backends("cpu")["triton"] is None  # TRITON_INTERPRET=1 (conftest)
needs_triton = pytest.mark.skipif(not TRITON, reason="needs the Triton interpreter (TRITON_INTERPRET=1)")


def packed_inputs(mode, head_dim, dtype, q_lens=Q_LENS, k_lens=K_LENS, heads=H):
    k_lens = q_lens if mode == "self" else k_lens
    qs, ks, vs = (make(n, head_dim, dtype, heads) for n in (q_lens, k_lens, k_lens))
    q, cu_q, max_q = mk.pack(qs)
    k, cu_k, max_k = mk.pack(ks)
    v, _, _ = mk.pack(vs)
    return (qs, ks, vs), (q, k, v, cu_q, cu_k, max_q, max_k)


# ----------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends(requires_grad=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [72, 128])
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_matches_per_sample_sdpa_fwd_bwd(backend, dtype, head_dim, mode):
    check_against_per_sample_sdpa(backend, dtype, head_dim, mode, Q_LENS, K_LENS)


@needs_triton
@pytest.mark.parametrize(
    "dtype, head_dim, mode",
    [
        (torch.float32, 72, "cross"),  # split head dim 64 + 16, masked remainder
        (torch.bfloat16, 72, "self"),
        (torch.bfloat16, 128, "cross"),  # one power-of-two column block
        (torch.float16, 40, "cross"),  # split 32 + 16
    ],
)
def test_triton_matches_per_sample_sdpa_fwd_bwd(dtype, head_dim, mode):
    """The Triton kernels under the interpreter (32-row tiles, one head to keep it quick):
    segments of 37 and 40 tokens cross a tile boundary in the query and key loops; cross
    has a segment without queries, one without keys and a length-1 key segment."""
    check_against_per_sample_sdpa("triton", dtype, head_dim, mode, [0, 1, 37, 2], [3, 0, 40, 1], heads=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("head_dim", [72, 128])
def test_every_cuda_backend_matches_per_sample_sdpa(mode, head_dim):
    """On a GPU: every backend usable there, bf16, forward and gradients, segments that
    cross the CUDA tiles (64 / 128 rows), an empty and a length-1 segment."""
    avail = mk.varlen_attention_backends("cuda", torch.bfloat16, head_dim, requires_grad=True)
    for backend in [n for n, why in avail.items() if why is None]:
        check_against_per_sample_sdpa(
            backend, torch.bfloat16, head_dim, mode, [130, 0, 1, 257], [70, 5, 0, 129], heads=2, device="cuda"
        )


def check_against_per_sample_sdpa(backend, dtype, head_dim, mode, q_lens, k_lens, heads=H, device="cpu"):
    _, (q, k, v, cu_q, cu_k, max_q, max_k) = packed_inputs(mode, head_dim, dtype, q_lens, k_lens, heads)
    q, k, v, cu_q, cu_k = (t.to(device) for t in (q, k, v, cu_q, cu_k))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    pieces = [mk.unpack(t, cu) for t, cu in ((q32, cu_q), (k32, cu_k), (v32, cu_k))]
    expected = per_sample_sdpa(*pieces)
    assert_close(out, expected, dtype)
    if mode == "cross":  # query rows of segments without keys are exactly zero
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        for b, nk in enumerate(k_lens):
            if nk == 0:
                assert torch.all(out[cu[b] : cu[b + 1]] == 0)

    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout.float())
    for name, got, want in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, scale=2.0)


@pytest.mark.parametrize("backend", cpu_backends(requires_grad=False))
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_every_backend_forward_matches_reference(backend, mode):
    _, (q, k, v, cu_q, cu_k, max_q, max_k) = packed_inputs(mode, 72, torch.float32)
    with torch.no_grad():
        out = mk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, scale=0.3)
    assert_close(out, varlen_attention_ref(q, k, v, cu_q, cu_k, scale=0.3))


@pytest.mark.parametrize("backend", cpu_backends(requires_grad=False) + (["triton"] if TRITON else []))
def test_non_contiguous_inputs(backend):
    """q, k, v as strided views of one fused qkv tensor, as the modules produce them."""
    qkv = torch.randn(sum(Q_LENS), 3, H, 40)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 5, 5, 6, 23, 26], dtype=torch.int64)
    with torch.no_grad():
        out = mk.varlen_attention(q, k, v, cu, cu, 17, 17, backend=backend)
    assert_close(out, varlen_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu))


def test_flex_document_mask_across_blocks():
    """Segments straddling FlexAttention's 128-token blocks: output, and the block
    structure (skipped blocks hold no allowed pair; full blocks hold only allowed pairs)."""
    q_lens, k_lens = [130, 0, 1, 300, 2], [3, 140, 0, 260, 128]
    qs, ks, vs = make(q_lens, 16, torch.float32), make(k_lens, 16, torch.float32), make(k_lens, 16, torch.float32)
    (q, cu_q, mq), (k, cu_k, mk_), (v, _, _) = mk.pack(qs), mk.pack(ks), mk.pack(vs)
    with torch.no_grad():
        out = mk.varlen_attention(q, k, v, cu_q, cu_k, mq, mk_, backend="flex")
    assert_close(out, per_sample_sdpa(qs, ks, vs))

    doc_q = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    doc_k = torch.repeat_interleave(torch.arange(len(k_lens)), torch.tensor(k_lens))
    allowed = doc_q[:, None] == doc_k[None, :]
    nq, nk = math.ceil(q.shape[0] / 128), math.ceil(k.shape[0] / 128)
    padded = torch.zeros(nq * 128, nk * 128, dtype=torch.bool)
    padded[: q.shape[0], : k.shape[0]] = allowed
    blocks = padded.view(nq, 128, nk, 128)
    any_allowed = blocks.any(3).any(1)
    valid = torch.zeros_like(padded)
    valid[: q.shape[0], : k.shape[0]] = True
    all_allowed = (blocks | ~valid.view(nq, 128, nk, 128)).all(3).all(1) & any_allowed

    mask = document_block_mask(cu_q, cu_k, q.shape[0], k.shape[0])
    visited = mask.to_dense()[0, 0].bool()
    assert torch.equal(visited, any_allowed)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        n = int(mask.full_kv_num_blocks[0, 0, i])
        full[i, mask.full_kv_indices[0, 0, i, :n].long()] = True
    assert torch.equal(full, all_allowed & full)  # full blocks are really full
    assert full.any()  # and the fast path is exercised


@pytest.mark.parametrize("backend", ["sdpa", "reference"] + (["triton"] if TRITON else []))
def test_gradcheck_fp64(backend):
    """fp64 through each backend (the triton backend's ops run their reference path)."""
    cu_q = torch.tensor([0, 2, 2, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 1, 3, 3, 6], dtype=torch.int32)
    q = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: mk.varlen_attention(q, k, v, cu_q, cu_k, 2, 3, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_reference_backward_is_autograd_of_reference():
    """The written-out backward the ops run equals autograd through the forward."""
    _, (q, k, v, cu_q, cu_k, _, _) = packed_inputs("cross", 24, torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = varlen_attention_ref(*leaves, cu_q, cu_k, scale=0.3)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, dout)
    got = varlen_attention_bwd_ref(dout, q, k, v, cu_q, cu_k, scale=0.3)
    for g, e in zip(got, expected):
        assert_close(g, e)
    _, lse = varlen_attention_fwd_ref(q, k, v, cu_q, cu_k, scale=0.3)
    assert torch.isinf(lse[:, 5]).all()  # query row 5 is segment 2, which has no keys
    assert torch.isfinite(lse[:, :5]).all() and torch.isfinite(lse[:, 6:]).all()


def test_reference_of_nothing():
    q = torch.randn(0, 2, 8)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert varlen_attention_ref(q, q, q, cu, cu).shape == (0, 2, 8)


@pytest.mark.parametrize("tq, tk", [(0, 4), (3, 0), (0, 0)])
def test_nothing_to_attend(tq, tk):
    q = torch.randn(tq, H, 8, requires_grad=True)
    k = torch.randn(tk, H, 8, requires_grad=True)
    v = torch.randn(tk, H, 8, requires_grad=True)
    cu_q = torch.tensor([0, tq], dtype=torch.int32)
    cu_k = torch.tensor([0, tk], dtype=torch.int32)
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, tq, tk)
    assert out.shape == (tq, H, 8) and torch.all(out == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.all(t.grad == 0)


# ----------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------


def test_auto_on_cpu_picks_per_segment_sdpa():
    q = torch.randn(4, H, 8)
    assert select_varlen_backend(q, q, q) == "sdpa"
    qg = q.requires_grad_()
    assert select_varlen_backend(qg, q, q) == "sdpa"
    avail = mk.varlen_attention_backends("cpu", requires_grad=True)
    assert avail["flex"] is not None and "backward" in avail["flex"]
    assert avail["sdpa"] is None and avail["reference"] is None


@pytest.mark.parametrize(
    "backend, match",
    [("flash", "flash-attn is not installed"), ("native", "needs CUDA"), ("bogus", "one of")],
)
def test_unavailable_backend_raises(backend, match):
    q = torch.randn(4, H, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        mk.varlen_attention(q, q, q, cu, cu, 4, 4, backend=backend)


def test_flex_with_grad_on_cpu_raises():
    q = torch.randn(4, H, 8, requires_grad=True)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="no backward on CPU"):
        mk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="flex")
    with torch.no_grad():  # no gradient needed: flex runs
        mk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="flex")


def test_compile_fullgraph_flex():
    """Under torch.compile, "auto" on CPU without grad takes FlexAttention: no host sync,
    one graph (value checks are skipped while compiling)."""
    _, (q, k, v, cu_q, cu_k, max_q, max_k) = packed_inputs("cross", 72, torch.float32)

    def fn(q, k, v, cu_q, cu_k):
        return mk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k)
    assert_close(out, varlen_attention_ref(q, k, v, cu_q, cu_k))


@needs_triton
def test_opcheck_triton_ops():
    cu_q = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 3, 3], dtype=torch.int64)
    q = torch.randn(5, 1, 72, requires_grad=True)
    k = torch.randn(3, 1, 72, requires_grad=True)
    v = torch.randn(3, 1, 72, requires_grad=True)
    torch.library.opcheck(torch.ops.mugv.varlen_attn_fwd.default, (q, k, v, cu_q, cu_k, 3, 2, 0.125))
    out, lse = torch.ops.mugv.varlen_attn_fwd(q, k, v, cu_q, cu_k, 3, 2, 0.125)
    assert torch.isinf(lse[:, 3:]).all()  # the segment without keys
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.mugv.varlen_attn_bwd.default,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu_q, cu_k, 3, 2, 0.125),
    )


@needs_triton
def test_triton_op_edges():
    """Empty packs launch nothing; too many segments for the grid is a ValueError."""
    empty = torch.randn(0, 2, 72)
    cu = torch.zeros(3, dtype=torch.int32)
    out, lse = torch.ops.mugv.varlen_attn_fwd(empty, empty, empty, cu, cu, 0, 0, 0.1)
    assert out.shape == (0, 2, 72) and lse.shape == (2, 0)
    many = torch.zeros(MAX_SEGMENTS + 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 65535 segments"):
        varlen_flash_attention(empty, empty, empty, many, many, 0, 0)


def test_head_dim_split_and_cuda_tiles():
    """Column blocks cover D with power-of-two blocks >= 16, split only when it saves lanes."""
    for D in range(1, 257):
        d1, d2, split = head_dim_split(D)
        lanes = d1 + d2 if split else d1
        assert lanes >= D and d1 >= 16 and d2 >= 16 and d1 & (d1 - 1) == 0 and d2 & (d2 - 1) == 0
        assert lanes <= max(16, 1 << (D - 1).bit_length())
        assert not split or lanes < (1 << (D - 1).bit_length())
    assert head_dim_split(72) == (64, 16, True) and head_dim_split(120) == (128, 16, False)
    for D in (64, 72, 128, 256):
        for kernel in ("fwd", "dkdv", "dq"):
            cfg = attn_launch_config(kernel, D, torch.device("cuda"))
            assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_warps in (4, 8)


@needs_triton
def test_compile_fullgraph_triton_fwd_bwd():
    """The Triton backend under torch.compile (aot_eager), forward and backward: one graph."""
    _, (q, k, v, cu_q, cu_k, max_q, max_k) = packed_inputs("cross", 72, torch.float32, heads=1)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def fn(q, k, v, cu_q, cu_k):
        return mk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend="triton")

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k)
    out.sum().backward()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = varlen_attention_ref(*leaves, cu_q, cu_k)
    expected.sum().backward()
    assert_close(out, expected)
    for got, want in zip((q, k, v), leaves):
        assert_close(got.grad, want.grad)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def _args(**override):
    q = torch.randn(5, H, 8)
    k = torch.randn(6, H, 8)
    args = dict(
        q=q, k=k, v=k.clone(),
        cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 4, 6], dtype=torch.int32),
        max_seqlen_q=3, max_seqlen_k=4,
    )  # fmt: skip
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(cu_seqlens_k=torch.tensor([1, 4, 6], dtype=torch.int32)), "cu_seqlens_k must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 7], dtype=torch.int32)), "end at the packed length 6"),
        (dict(cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32)), "same number of segments, got 2 and 1"),
        (dict(cu_seqlens_q=torch.tensor([[0, 2, 5]], dtype=torch.int32)), "1-D"),
        (dict(k=torch.randn(6, H, 16), v=torch.randn(6, H, 16)), "same head dim"),
        (dict(v=torch.randn(6, H, 4)), "same head dim"),
        (dict(k=torch.randn(6, 2, 8), v=torch.randn(6, 2, 8)), "same number of heads"),
        (dict(v=torch.randn(5, H, 8)), "same length"),
        (dict(q=torch.randn(5, H, 0), k=torch.randn(6, H, 0), v=torch.randn(6, H, 0)), "head dim must be >= 1"),
        (dict(q=torch.randn(5, 8)), "3-D"),
        (dict(max_seqlen_q=torch.tensor(3)), "max_seqlen_q must be a Python int"),
        (dict(max_seqlen_k=3), "max_seqlen_k = 3 is smaller than the longest segment"),
        (dict(max_seqlen_q=-1), ">= 0"),
    ],
)
def test_bad_input_value_error(override, match):
    with pytest.raises(ValueError, match=match):
        mk.varlen_attention(**_args(**override))


def test_bad_input_type_error():
    with pytest.raises(TypeError, match="share a dtype"):
        mk.varlen_attention(**_args(k=torch.randn(6, H, 8, dtype=torch.float64), v=torch.randn(6, H, 8)))
    with pytest.raises(TypeError, match="dtype"):
        mk.varlen_attention(**_args(q=torch.randint(0, 3, (5, H, 8))))
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32/int64"):
        mk.varlen_attention(**_args(cu_seqlens_q=torch.tensor([0.0, 2.0, 5.0])))


def test_validate_false_skips_value_checks():
    """validate=False trusts the offsets (as compiled code must): no sync, no value check."""
    out = mk.varlen_attention(**_args(max_seqlen_k=1), validate=False)
    assert out.shape == (5, H, 8)


# ----------------------------------------------------------------------------------------
# nn modules
# ----------------------------------------------------------------------------------------


def test_self_attention_module_matches_per_sample():
    torch.manual_seed(1)
    mod = VarlenSelfAttention(48, 4)
    assert {"qkv.weight", "qkv.bias", "q_norm.weight", "k_norm.weight", "proj.weight"} <= set(mod.state_dict())
    xs = [torch.randn(n, 48) for n in (6, 1, 0, 9)]
    x, cu, m = mk.pack(xs)
    seen = []

    def rotary(q, k):
        seen.append(q.shape)
        return q * 0.5, k

    out = mod(x, cu, m, rotary=rotary)
    assert seen == [(16, 4, 12)]
    one = torch.tensor([0, 0], dtype=torch.int32)
    expected = [mod(t, one + torch.tensor([0, t.shape[0]], dtype=torch.int32), t.shape[0], rotary) for t in xs]
    assert_close(out, torch.cat(expected))


def test_cross_attention_module_matches_per_sample():
    torch.manual_seed(2)
    mod = VarlenCrossAttention(32, 2, context_dim=20)
    assert {"q_linear.weight", "kv_linear.weight", "q_norm.weight", "k_norm.weight", "proj.bias"} <= set(
        mod.state_dict()
    )
    xs = [torch.randn(n, 32) for n in (4, 3, 0)]
    cs = [torch.randn(n, 20) for n in (5, 0, 2)]
    (x, cu_q, mq), (c, cu_k, mk_) = mk.pack(xs), mk.pack(cs)
    x.requires_grad_()
    out = mod(x, c, cu_q, cu_k, mq, mk_)
    out.sum().backward()
    assert torch.all(mod.proj(torch.zeros(1, 32)) == out[4:7])  # caption of 0 tokens: attention output 0
    per = []
    for xi, ci in zip(xs, cs):
        cq = torch.tensor([0, xi.shape[0]], dtype=torch.int32)
        ck = torch.tensor([0, ci.shape[0]], dtype=torch.int32)
        per.append(mod(xi, ci, cq, ck, xi.shape[0], ci.shape[0]))
    assert_close(out, torch.cat(per))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_modules_validate_arguments():
    with pytest.raises(ValueError, match="must divide"):
        VarlenSelfAttention(10, 3)
    with pytest.raises(ValueError, match="must divide"):
        VarlenCrossAttention(10, 4)
    with pytest.raises(ValueError, match="backend"):
        VarlenAttention(backend="xformers")
    mod = VarlenCrossAttention(8, 2, qk_norm=False)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="x must be"):
        mod(torch.randn(2, 4), torch.randn(2, 8), cu, cu, 2, 2)
    with pytest.raises(ValueError, match="context must be"):
        mod(torch.randn(2, 8), torch.randn(2, 4), cu, cu, 2, 2)
    with pytest.raises(ValueError, match="x must be"):
        VarlenSelfAttention(8, 2)(torch.randn(1, 2, 8), cu, 2)
    assert "backend='sdpa', validate=False" in repr(VarlenAttention(backend="sdpa", validate=False))


def test_varlen_attention_module_is_the_function():
    _, (q, k, v, cu_q, cu_k, max_q, max_k) = packed_inputs("cross", 16, torch.float32)
    mod = VarlenAttention(scale=0.2, backend="reference")
    assert_close(mod(q, k, v, cu_q, cu_k, max_q, max_k), varlen_attention_ref(q, k, v, cu_q, cu_k, scale=0.2))
