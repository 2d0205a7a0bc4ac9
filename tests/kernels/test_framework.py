"""The op framework itself: backend selection, the plain-CPU (no interpreter) path,
launch capture (the sm_90a ahead-of-time check and its gates: test_aot.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mugv_kernels
from mugv_kernels import _registry, _validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_without_interpreter(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_interpreter_mode_uses_triton_on_cpu():
    assert _registry.INTERPRET  # set by conftest before import
    assert _registry.use_triton(torch.empty(1))
    assert not _registry.use_triton(torch.empty(1, dtype=torch.float64))  # fp64: reference


def test_capture_records_launches_without_running():
    x = torch.empty(1, 5, 72, device="meta")
    mod = torch.empty(1, 72, device="meta")
    assert not mugv_kernels.is_capturing()
    with _registry.capture_launches() as launches:
        assert mugv_kernels.is_capturing() and _registry.is_capturing()
        assert _registry.use_triton(torch.empty(1, dtype=torch.float64))
        mugv_kernels.ops.ada_norm._adaln_fwd_launch(x, None, None, mod, mod, None, None, None, 1e-6, False, True)
    assert len(launches) == 1 and launches[0].grid == (5,)
    assert launches[0].kwargs["BLOCK_C"] == 128
    assert not _registry.use_triton(torch.empty(1, device="meta"))  # outside the context again
    assert not mugv_kernels.is_capturing()


def test_shared_validators():
    assert _validate.triple("stride", 2) == (2, 2, 2)
    assert _validate.triple("stride", [1, 2, 3]) == (1, 2, 3)
    with pytest.raises(TypeError, match="stride must be an int or a tuple of three ints"):
        _validate.triple("stride", True)
    with pytest.raises(ValueError, match="stride must be an int or a tuple of three ints"):
        _validate.triple("stride", (1, 2))
    with pytest.raises(ValueError, match="stride must be positive"):
        _validate.triple("stride", (1, 0, 1))
    _validate.check_dtype("x", None, _validate.FLOAT_DTYPES)  # optional arguments pass
    with pytest.raises(TypeError, match="x must have dtype float32/bfloat16/float16/float64, got torch.int32"):
        _validate.check_dtype("x", torch.zeros(1, dtype=torch.int32), _validate.FLOAT_DTYPES)
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got list"):
        _validate.check_tensor("w", [1.0])
    with pytest.raises(ValueError, match="backend must be one of \\('auto', 'triton', 'reference'\\), got 'cuda'"):
        _registry.check_backend("cuda", torch.empty(1))


def test_plain_cpu_runs_reference_through_triton_op():
    """Without TRITON_INTERPRET the ops are ``triton_op``s whose CPU path is the reference:
    values, gradients, opcheck and torch.compile must all hold there too."""
    script = textwrap.dedent(
        """
        import torch, mugv_kernels as mk
        from mugv_kernels import _registry
        from mugv_kernels.reference import ada_norm_chain
        assert not _registry.INTERPRET and not _registry.use_triton(torch.empty(1))
        torch.manual_seed(0)
        B, N, C, G = 2, 5, 72, 2
        res, x = torch.randn(B, N, C, requires_grad=True), torch.randn(B, N, C, requires_grad=True)
        g, sh, sc = (torch.randn(B, G, C, requires_grad=True) for _ in range(3))
        idx = torch.randint(0, G, (B, N))
        r, out = mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=idx)
        r2, out2 = ada_norm_chain(x, res, g, sh, sc, idx)
        torch.testing.assert_close(out, out2); torch.testing.assert_close(r, r2)
        ga = torch.autograd.grad(out.square().sum() + r.sum(), [res, x, g, sh, sc])
        gb = torch.autograd.grad(out2.square().sum() + r2.sum(), [res, x, g, sh, sc])
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
        torch.library.opcheck(torch.ops.mugv.adaln_fwd, (x, res, g, sh, sc, idx, None, None, 1e-6, False, True))
        f = torch.compile(lambda *a: mk.gated_residual_ada_layer_norm(*a, index=idx), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(f(res, x, g, sh, sc)[1], out)
        print("reference path ok")
        """
    )
    proc = _run_without_interpreter(["-c", script], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference path ok" in proc.stdout
