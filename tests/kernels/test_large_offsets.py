"""Addressing past 2^31 elements: every Triton kernel computes its offsets in 64 bits.

Each test builds tensors of more than 2^31 elements (``torch.empty``: only the pages a
kernel touches are ever backed by memory, so a 4 GiB bf16 tensor costs a few MiB) and runs
the op with the launch limited to its final programs (:func:`final_programs`: the
interpreter runs only the last programs of the grid, which see their true program ids and
grid size). Those programs address elements past 2^31; their results must equal the same op
run on the small slice they cover, which the other kernel tests check against the reference.

Under ``TRITON_INTERPRET=1`` integer arithmetic is numpy's: an int32 product wraps exactly
as on the GPU. :func:`test_harness_catches_int32_offsets` shows that a kernel with int32
row offsets fails this check, so the tests can fail. (In the kernels a wrapped offset
usually points outside every mapping: the test process then dies of SIGSEGV, which
pytest reports as a failure.) Other tests use strided views into one untouched storage,
whose strides times indices pass 2^31 while every program runs.
"""

import contextlib
import os

import pytest
import torch

import mugv_kernels  # noqa: F401  (registers torch.ops.mugv)
from mugv_kernels.reference import ada_norm as ada_norm_ref
from mugv_kernels.reference import conv3d as conv_ref
from mugv_kernels.reference import group_norm as gn_ref
from mugv_kernels.reference import rope as rope_ref
from mugv_kernels.reference import varlen_attention as attn_ref
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the Triton interpreter")

INT32_MAX = 2**31 - 1


@contextlib.contextmanager
def final_programs(*keep: int | None, per_kernel: dict | None = None):
    """Run only the last ``keep[a]`` programs along grid axis ``a`` (None or missing: all)
    of every launch inside the block; ``per_kernel`` maps a kernel's name to its own
    ``keep`` tuple. The programs see their true ``tl.program_id`` and ``tl.num_programs``."""
    import numpy as np
    from triton.runtime import interpreter as ti

    real_call = ti.GridExecutor.__call__
    builder = ti.interpreter_builder
    real_pid, real_nprog = builder.create_get_program_id, builder.create_get_num_programs

    def call(self, *args, **kwargs):
        full = tuple(self.grid) + (1,) * (3 - len(self.grid))
        want = (per_kernel or {}).get(self.fn.__name__, keep)
        kept = tuple(n if a >= len(want) or want[a] is None else min(n, want[a]) for a, n in enumerate(full))
        first = tuple(n - k for n, k in zip(full, kept))

        def pid(axis):
            return ti.TensorHandle(np.array([builder.grid_idx[axis] + first[axis]], dtype=np.int32), ti.tl.int32)

        def nprog(axis):
            return ti.TensorHandle(np.array([full[axis]], dtype=np.int32), ti.tl.int32)

        builder.create_get_program_id, builder.create_get_num_programs = pid, nprog
        grid, self.grid = self.grid, kept
        try:
            real_call(self, *args, **kwargs)
        finally:
            self.grid = grid
            builder.create_get_program_id, builder.create_get_num_programs = real_pid, real_nprog

    ti.GridExecutor.__call__ = call
    try:
        yield
    finally:
        ti.GridExecutor.__call__ = real_call


def big(shape, dtype=torch.bfloat16, *, tail=0):
    """An uninitialized tensor of ``shape`` (never touched, so never backed by memory) whose
    last ``tail`` entries along dim 0 hold random values."""
    t = torch.empty(shape, dtype=dtype)
    if tail:
        t[-tail:] = torch.randn(t[-tail:].shape).to(dtype)
    return t


# ---------------------------------------------------------------------------------------
# The harness can fail: a kernel with int32 row offsets does.
# ---------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _copy_rows_i32(X, Y, C: tl.constexpr):
    row = tl.program_id(0)  # int32: row * C wraps past 2^31
    cols = tl.arange(0, C)
    tl.store(Y + row * C + cols, tl.load(X + row * C + cols))


@triton.jit
def _copy_rows_i64(X, Y, C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, C)
    tl.store(Y + row * C + cols, tl.load(X + row * C + cols))


def test_harness_catches_int32_offsets():
    C, rows = 1024, 2**21 + 2  # 2^31 + 2048 elements
    # views that start 2^31 elements into their buffers: a wrapped (negative) offset lands in
    # mapped memory, so the int32 kernel reads and writes the wrong rows instead of crashing
    x_buf, y_buf = torch.empty(2**31 + rows * C, dtype=torch.int8), torch.empty(2**31 + rows * C, dtype=torch.int8)
    x, y = x_buf[2**31:].view(rows, C), y_buf[2**31:].view(rows, C)
    x[-2:] = torch.randint(-100, 100, (2, C), dtype=torch.int8)
    for kernel, right in ((_copy_rows_i64, True), (_copy_rows_i32, False)):
        y[-2:] = 0
        with final_programs(2):
            kernel[(rows,)](x, y, C=C)
        assert torch.equal(y[-2:], x[-2:]) is right, kernel


# ---------------------------------------------------------------------------------------
# adaLN: [B, N, C] rows; the last sample starts past 2^31.
# ---------------------------------------------------------------------------------------

ADALN = dict(B=16385, N=32, C=4096)  # 16385 * 32 * 4096 = 2^31 + 2^17 elements
ADALN_OPTS = dict(eps=1e-6, rms=False, do_norm=True)


def _last(args, n=1):
    """The last ``n`` samples of every per-sample tensor argument."""
    return {k: (v[-n:] if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in args.items()}


def test_adaln_fwd_past_2_31():
    B, N, C = ADALN.values()
    G = 2
    a = dict(x=big((B, N, C), tail=1), residual=big((B, N, C), tail=1), gate=big((B, G, C), tail=1),
             shift=big((B, G, C), tail=1), scale=big((B, G, C), tail=1),
             index=torch.randint(0, G, (B, N), dtype=torch.int32),
             weight=torch.randn(C).bfloat16(), bias=torch.randn(C).bfloat16())
    assert a["x"][-1, -1, -1:].storage_offset() > INT32_MAX
    with final_programs(2):  # one program per row: the last two rows
        r, out, mean, rstd = torch.ops.mugv.adaln_fwd(**a, **ADALN_OPTS)
    want = ada_norm_ref.adaln_fwd_ref(**_last(a), **ADALN_OPTS)
    for got, ref in zip((r, out, mean, rstd), want):  # statistics of the bf16 residual stream: bf16 tolerance
        assert_close(got[-1:, -2:], ref[:, -2:], dtype=torch.bfloat16)


def test_adaln_bwd_past_2_31():
    B, N, C = ADALN.values()
    # the [B, C] modulation has fp32 [B, C] gradient partials (zero-filled: touched), so only a gate here
    a = dict(x=big((B, N, C), tail=1), residual=big((B, N, C), tail=1), gate=big((B, C), tail=1), shift=None,
             scale=None, index=None, weight=None, bias=None)
    small = _last(a)
    r1, _, mean1, rstd1 = ada_norm_ref.adaln_fwd_ref(**small, **ADALN_OPTS)
    r, mean, rstd = big((B, N, C)), torch.zeros(B, N), torch.zeros(B, N)
    r[-1:], mean[-1:], rstd[-1:] = r1, mean1, rstd1
    dout, dr = big((B, N, C), tail=1), big((B, N, C), tail=1)
    assert dout[-1, -1, -1:].storage_offset() > INT32_MAX
    with final_programs(1):  # grid (B, chunks): the last sample
        grads = torch.ops.mugv.adaln_bwd(dr=dr, dout=dout, **a, r=r, mean=mean, rstd=rstd, **ADALN_OPTS)
    want = ada_norm_ref.adaln_bwd_ref(dr[-1:], dout[-1:], **small, r=r1, mean=mean1, rstd=rstd1, **ADALN_OPTS)
    for got, ref in zip(grads[:3], want[:3]):  # dx, dresidual, dgate of the last sample
        assert_close(got[-1:], ref, scale=2.0)


# ---------------------------------------------------------------------------------------
# RoPE (+ QK-norm): [B, N, H, D] tokens; the last tokens sit past 2^31.
# ---------------------------------------------------------------------------------------

ROPE = dict(B=2, N=2**21 + 16, H=4, D=128)  # 2^31 + 2^14 elements


@pytest.mark.parametrize("interleaved,across_heads", [(True, False), (False, True)])
def test_rope_fwd_bwd_past_2_31(interleaved, across_heads):
    B, N, H, D = ROPE.values()
    t_fwd, t_bwd = 16, 32  # tokens of the last forward / backward program under the interpreter
    q, k, dq_out, dk_out = (big((B, N, H, D)) for _ in range(4))
    for t in (q, k, dq_out, dk_out):
        t[-1, -t_bwd:] = torch.randn(t_bwd, H, D).bfloat16()
    positions = torch.empty(N, 3, dtype=torch.int32)  # shared by the batch
    positions[-t_bwd:] = torch.randint(0, 1000, (t_bwd, 3), dtype=torch.int32)
    C = H * D if across_heads else D
    qw, kw = torch.rand(C).bfloat16() + 0.5, torch.rand(C).bfloat16() + 0.5
    opts = dict(sections=[42, 42, 40], eps=1e-6, theta=1e4, interleaved=interleaved, across_heads=across_heads)
    assert q[-1, -1, -1, -1:].storage_offset() > INT32_MAX
    with final_programs(1):
        q_out, k_out = torch.ops.mugv.qk_norm_rope3d_fwd(q, k, positions, qw, kw, **opts)
        dq, dk, _, _ = torch.ops.mugv.qk_norm_rope3d_bwd(dq_out, dk_out, q, k, positions, qw, kw, **opts)
    tail = (slice(-1, None), slice(-t_bwd, None))
    small = [t[tail] for t in (dq_out, dk_out, q, k)]
    want_fwd = rope_ref.rope3d_fwd_ref(small[2], small[3], positions[-t_bwd:], qw, kw, **opts)
    want_bwd = rope_ref.rope3d_bwd_ref(*small, positions[-t_bwd:], qw, kw, **opts)
    for got, ref in zip((q_out, k_out), want_fwd):
        assert_close(got[tail][:, -t_fwd:], ref[:, -t_fwd:])
    for got, ref in zip((dq, dk), want_bwd):  # (the weight gradients sum over every program)
        assert_close(got[tail], ref)


# ---------------------------------------------------------------------------------------
# GroupNorm + SiLU: [B, C, S] views whose batch or position stride times its index passes
# 2^31 (a VAE activation of more than 2^31 elements has the same offsets); every program runs.
# ---------------------------------------------------------------------------------------

GN_STORAGE = 3 * 2**30 + 2**27  # elements (bf16: 6.25 GiB of address space, a few pages touched)


def _strided_views(shape, strides, count):
    """``count`` disjoint views of ``shape``/``strides`` into one untouched storage, filled
    with random values (views i = 0, 1, ... start at element offset 16 i)."""
    store = torch.empty(GN_STORAGE, dtype=torch.bfloat16)
    views = [store.as_strided(shape, strides, 16 * i) for i in range(count)]
    for v in views:
        v.copy_(torch.randn(shape))
    last = sum((n - 1) * s for n, s in zip(shape, strides)) + 16 * (count - 1)
    assert INT32_MAX < last < GN_STORAGE
    return views


@pytest.mark.parametrize("shape,strides", [
    ((3, 16, 40), (2**30 + 2**28, 1, 16)),  # the last sample starts past 2^31
    ((2, 16, 48), (16, 1, 2**26)),  # one sample: positions past 2^31 (channels-last)
], ids=["batch", "positions"])  # fmt: skip
def test_group_norm_silu_past_2_31(shape, strides):
    x, dy = _strided_views(shape, strides, 2)
    C, G = shape[1], 4
    w, b = torch.rand(C).bfloat16() + 0.5, torch.randn(C).bfloat16()
    y, mean, rstd = torch.ops.mugv.group_norm_silu_fwd(x, w, b, G, 1e-6, True)
    dx, dw, db = torch.ops.mugv.group_norm_silu_bwd(dy, x, w, b, mean, rstd, G, 1e-6, True)
    xc, dyc = x.contiguous(), dy.contiguous()
    assert_close(y, gn_ref.group_norm_silu_ref(xc, G, w, b, eps=1e-6, silu=True))
    for got, ref in zip((dx, dw, db), gn_ref.group_norm_silu_bwd_ref(dyc, xc, w, b, G, 1e-6, True)):
        assert_close(got, ref, dtype=torch.bfloat16, scale=2.0)


# ---------------------------------------------------------------------------------------
# Varlen attention: packed [T, H, D]; the last sequence starts past 2^31.
# ---------------------------------------------------------------------------------------

VARLEN = dict(B=61683, L=136, H=2, D=128)  # T = B * L tokens: 2^31 + 37120 elements


def test_varlen_attention_fwd_bwd_past_2_31():
    B, L, H, D = VARLEN.values()
    T = B * L
    q, k, v, dout = (big((T, H, D), tail=L) for _ in range(4))
    assert q[-L:].storage_offset() > INT32_MAX
    cu = torch.arange(B + 1, dtype=torch.int32) * L
    scale = D**-0.5
    # grid (query or key blocks, B, H): the last sequence; the delta kernel (token blocks of
    # 32, H): the last sequence's tokens
    last_seq = dict(per_kernel={"_varlen_attn_bwd_delta_kernel": (-(-L // 32), None)})
    with final_programs(None, 1, None, **last_seq):
        out, lse = torch.ops.mugv.varlen_attn_fwd(q, k, v, cu, cu, L, L, scale)
        dq, dk, dv = torch.ops.mugv.varlen_attn_bwd(dout, q, k, v, out, lse, cu, cu, L, L, scale)
    cu1 = torch.tensor([0, L], dtype=torch.int32)
    want_out, want_lse = attn_ref.varlen_attention_fwd_ref(q[-L:], k[-L:], v[-L:], cu1, cu1, scale)
    assert_close(out[-L:], want_out)
    assert_close(lse[:, -L:], want_lse, dtype=torch.bfloat16)
    for got, ref in zip((dq, dk, dv), attn_ref.varlen_attention_bwd_ref(dout[-L:], q[-L:], k[-L:], v[-L:], cu1, cu1,
                                                                         scale)):
        assert_close(got[-L:], ref, scale=2.0)


# ---------------------------------------------------------------------------------------
# Causal conv3d: [B, C, T, H, W] views whose channel stride times the channel index passes
# 2^31 (the offsets of a channels-first activation of more than 2^31 elements per sample);
# every program of the forward, dx and dw kernels runs.
# ---------------------------------------------------------------------------------------


def _slab_view(store, shape, sxc, offset):
    """``shape`` with channel stride ``sxc`` and dense (b, t, h, w) strides inside each
    channel's slab, starting at ``offset``; filled with random values."""
    B, C, T, H, W = shape
    v = store.as_strided(shape, (T * H * W, sxc, H * W, W, 1), offset)
    v.copy_(torch.randn(shape))
    return v


@pytest.mark.parametrize("c_in,sxc", [(24, 2**27), (8, 2**28 + 2**26)], ids=["channel-loop", "flat-taps"])
def test_causal_conv3d_past_2_31(c_in, sxc):
    B, C_out, T, H, W = 2, 24, 4, 4, 8
    store = torch.empty((max(c_in, C_out) - 1) * sxc + 2048, dtype=torch.bfloat16)
    x = _slab_view(store, (B, c_in, T, H, W), sxc, 0)
    ctx = _slab_view(store, (B, c_in, 2, H, W), sxc, 512)  # the 2 frames before x (front padding)
    dy = _slab_view(store, (B, C_out, T, H, W), sxc, 1024)
    assert (c_in - 1) * sxc > INT32_MAX and (C_out - 1) * sxc > INT32_MAX
    w, b = (torch.randn(C_out, c_in, 3, 1, 3) * 0.3).bfloat16(), torch.randn(C_out).bfloat16()
    conv = dict(stride=[1, 1, 1], dilation=[1, 1, 1], front=2, back=0, replicate=False)
    y = torch.ops.mugv.causal_conv3d_fwd(x, ctx, w, b, **conv)
    grads = torch.ops.mugv.causal_conv3d_bwd(dy, x, ctx, w, need=[True, True, True, True], **conv)
    xc, cc, dyc = x.contiguous(), ctx.contiguous(), dy.contiguous()
    assert_close(y, conv_ref.conv3d_padded_ref(xc, cc, w, b, **conv), scale=2.0)
    want = conv_ref.conv3d_bwd_ref(dyc, xc, cc, w, True, **conv)
    for got, ref in zip(grads, want):  # dx, dcontext, dweight, dbias
        assert_close(got, ref, dtype=torch.bfloat16, scale=4.0)


def test_causal_conv3d_outputs_past_2_31():
    """Channels-first input, output and dx of 2.3e9 elements whose last channel starts past
    2^31: the last output (and input) positions, from the final programs of the grid."""
    C, T, H, W = 16, 4, 4096, 8760
    assert (C - 1) * T * H * W > INT32_MAX  # channel index x channel stride
    x, dy = big((1, C, T, H, W)), big((1, C, T, H, W))
    x[:, :, -3:, -1:] = torch.randn(1, C, 3, 1, W).bfloat16()  # all the last positions read
    dy[:, :, -3:, -1:] = torch.randn(1, C, 3, 1, W).bfloat16()
    assert x[0, -1, -1, -1, -1:].storage_offset() > INT32_MAX
    w = (torch.randn(C, C, 3, 1, 3) * 0.3).bfloat16()
    conv = dict(stride=[1, 1, 1], dilation=[1, 1, 1], front=2, back=0, replicate=False)
    with final_programs(1):  # grid (row blocks, channel blocks): the last 256 positions
        y = torch.ops.mugv.causal_conv3d_fwd(x, None, w, None, **conv)
        dx = torch.ops.mugv.causal_conv3d_bwd(dy, x, None, w, need=[True, False, False, False], **conv)[0]
    assert y.shape == x.shape and y.is_contiguous() and dx.is_contiguous()
    # frames T-3 .. T-1 of the last row hold everything the last frame's outputs and dx see
    xs, dys = x[:, :, -3:, -1:].contiguous(), dy[:, :, -3:, -1:].contiguous()
    tail = (slice(None), slice(None), -1, -1, slice(-256, None))
    assert_close(y[tail], conv_ref.conv3d_padded_ref(xs, None, w, None, **conv)[tail], scale=2.0)
    assert_close(dx[tail], conv_ref.conv3d_bwd_ref(dys, xs, None, w, False, **conv)[0][tail], scale=2.0)
