"""``backend=`` of every public op: ``"reference"`` runs the family's PyTorch reference and
no ``mugv`` custom op, ``"triton"`` runs the op, a bad name is a ``ValueError`` naming it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mugv_kernels as mk
from mugv_kernels import _registry
from mugv_kernels.reference import (
    ada_norm_chain,
    causal_conv3d_ref,
    group_norm_silu_ref,
    qk_norm_rope3d_ref,
    varlen_attention_ref,
)


class _OpLog(TorchDispatchMode):
    """Records the namespace of every op dispatched inside the context."""

    def __init__(self):
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _case(name: str):
    """``(call(backend), reference())`` of one public op on small random inputs."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x, res = rnd(2, 5, 8), rnd(2, 5, 8)
    shift, scale, gate = rnd(2, 8), rnd(2, 8), rnd(2, 8)
    w = rnd(8)
    q, k = rnd(2, 3, 2, 12), rnd(2, 3, 2, 12)
    pos = mk.video_positions(1, 1, 1)  # [3, 3]: start token, one patch, end token
    secs = (4, 4, 4)
    if name == "ada_layer_norm":
        return (
            lambda b: mk.ada_layer_norm(x, shift, scale, weight=w, backend=b),
            lambda: ada_norm_chain(x, None, None, shift, scale, None, w)[1],
        )
    if name == "gated_residual":
        return (
            lambda b: mk.gated_residual(res, x, gate, backend=b),
            lambda: ada_norm_chain(x, res, gate, do_norm=False)[0],
        )
    if name == "gated_residual_ada_layer_norm":
        return (
            lambda b: mk.gated_residual_ada_layer_norm(res, x, gate, shift, scale, norm="rms", backend=b),
            lambda: ada_norm_chain(x, res, gate, shift, scale, rms=True),
        )
    if name == "qk_norm_rope3d":
        return (
            lambda b: mk.qk_norm_rope3d(q, k, pos, secs, q_weight=w[:4].repeat(3), backend=b),
            lambda: (qk_norm_rope3d_ref(q, pos, secs, w[:4].repeat(3)), qk_norm_rope3d_ref(k, pos, secs)),
        )
    if name == "rope3d":
        return (
            lambda b: mk.rope3d(q, pos, secs, interleaved=False, backend=b),
            lambda: qk_norm_rope3d_ref(q, pos, secs, interleaved=False),
        )
    if name == "varlen_attention":
        qa, ka = rnd(7, 2, 8), rnd(5, 2, 8)
        cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 1, 5], dtype=torch.int32)
        return (
            lambda b: mk.varlen_attention(qa, ka, ka, cu_q, cu_k, 4, 4, scale=0.3, backend=b),
            lambda: varlen_attention_ref(qa, ka, ka, cu_q, cu_k, 0.3),
        )
    if name == "causal_conv3d":
        xc, wc, bc = rnd(1, 3, 4, 5, 5), rnd(2, 3, 3, 3, 3), rnd(2)
        return (
            lambda b: mk.causal_conv3d(xc, wc, bc, pad_mode="replicate", backend=b),
            lambda: causal_conv3d_ref(xc, wc, bc, pad_mode="replicate"),
        )
    if name == "group_norm_silu":
        xg = rnd(2, 6, 3, 4)
        return (
            lambda b: mk.group_norm_silu(xg, 3, w[:6], w[2:], backend=b),
            lambda: group_norm_silu_ref(xg, 3, w[:6], w[2:]),
        )
    raise AssertionError(name)


OPS = [
    "ada_layer_norm",
    "gated_residual",
    "gated_residual_ada_layer_norm",
    "qk_norm_rope3d",
    "rope3d",
    "varlen_attention",
    "causal_conv3d",
    "group_norm_silu",
]


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", OPS)
def test_reference_backend_runs_the_reference(name):
    call, reference = _case(name)
    with _OpLog() as log:
        out = call("reference")
    assert "mugv" not in log.namespaces
    for o, r in zip(_flat(out), _flat(reference()), strict=True):
        assert torch.equal(o, r)


@pytest.mark.parametrize("name", OPS)
def test_triton_backend_runs_the_op(name):
    assert _registry.INTERPRET  # CPU tensors run the Triton kernels under the interpreter
    call, reference = _case(name)
    with _OpLog() as log:
        out = call("triton")
    assert "mugv" in log.namespaces
    for o, r in zip(_flat(out), _flat(reference()), strict=True):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", OPS)
def test_bad_backend_is_a_value_error_naming_it(name):
    call, _ = _case(name)
    with pytest.raises(ValueError, match="'no-such-backend'"):
        call("no-such-backend")


@pytest.mark.parametrize("name", ["ada_layer_norm", "rope3d", "causal_conv3d", "group_norm_silu"])
def test_reference_backend_is_differentiable(name):
    """The reference path is plain autograd: gradients reach the inputs."""
    torch.manual_seed(0)
    if name == "ada_layer_norm":
        x = torch.randn(1, 3, 8, requires_grad=True)
        y = mk.ada_layer_norm(x, torch.randn(1, 8), torch.randn(1, 8), backend="reference")
    elif name == "rope3d":
        x = torch.randn(3, 2, 12, requires_grad=True)
        y = mk.rope3d(x, mk.video_positions(1, 1, 1), (4, 4, 4), backend="reference")
    elif name == "causal_conv3d":
        x = torch.randn(1, 2, 3, 4, 4, requires_grad=True)
        y = mk.causal_conv3d(x, torch.randn(2, 2, 3, 3, 3), backend="reference")
    else:
        x = torch.randn(1, 4, 3, 3, requires_grad=True)
        y = mk.group_norm_silu(x, 2, backend="reference")
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    assert gx.shape == x.shape and gx.abs().sum() > 0


def test_triton_backend_needs_a_device_where_triton_runs(monkeypatch):
    """Without the interpreter, CPU tensors cannot run ``backend="triton"``."""
    monkeypatch.setattr(_registry, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        mk.ada_layer_norm(torch.randn(1, 2, 8), None, None, backend="triton")


def test_reference_backend_compiles_fullgraph():
    """A model built with ``backend="reference"`` compiles with ``fullgraph=True``: the
    dispatch is plain Python and the references are plain PyTorch."""
    torch.manual_seed(0)
    x, mod = torch.randn(1, 3, 12), torch.randn(1, 12)
    q = torch.randn(3, 2, 12)
    pos = mk.video_positions(1, 1, 1)
    v = torch.randn(1, 2, 3, 4, 4)
    wc = torch.randn(4, 2, 3, 3, 3)

    def model(x, q, v):
        y = mk.ada_layer_norm(x, mod, mod, backend="reference")
        r, y = mk.gated_residual_ada_layer_norm(x, y, mod, mod, mod, backend="reference")
        qo, ko = mk.qk_norm_rope3d(q, q, pos, (4, 4, 4), q_weight=x[0, 0], backend="reference")
        h = mk.group_norm_silu(mk.causal_conv3d(v, wc, backend="reference"), 2, backend="reference")
        return mk.gated_residual(r, y, mod, backend="reference"), qo + ko, h

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, q, v), model(x, q, v), strict=True):
        torch.testing.assert_close(a, b)
