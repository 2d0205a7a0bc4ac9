"""Test setup: run the real Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, so it is
set here, before ``mugv_kernels`` is imported by any test module.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mugv-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Per-dtype tolerances against an fp32 reference. bf16/fp16 outputs are one rounding of
# an fp32 result (the interpreter truncates instead of rounding: up to 1 ulp).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's),
    widened by ``scale`` (for long reductions)."""
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale
    )
