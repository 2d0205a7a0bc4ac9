"""Shared test helpers: per-dtype tolerances and comparison rules.

Imported by the test modules as ``from tests.helpers import ...``. The environment
(``TRITON_INTERPRET=1`` without a GPU, a per-run Inductor cache) is set by the repository's
root ``conftest.py``, before anything imports ``mugv_kernels``.
"""

import torch

# Per-dtype tolerances against an fp32 reference. bf16/fp16 outputs are one rounding of
# an fp32 result (the interpreter truncates instead of rounding: up to 1 ulp).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's),
    widened by ``scale`` (for long reductions)."""
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale
    )


def assert_close_to_ref(actual: torch.Tensor, ref_lowp: torch.Tensor, ref_fp32: torch.Tensor, factor: float = 2.0):
    """flash-attn's rule for low precision: the kernel's error against an fp32 reference is
    at most ``factor`` times the error of the same-dtype PyTorch reference (plus one ulp
    of slack for the interpreter's truncating stores). fp32 inputs: the fp32 tolerance."""
    if actual.dtype == torch.float32:
        assert_close(actual, ref_fp32)
        return
    assert actual.shape == ref_fp32.shape and actual.dtype == ref_lowp.dtype
    if actual.numel() == 0:
        return
    ulp = torch.finfo(actual.dtype).eps * ref_fp32.float().abs().max().clamp_min(1.0)
    err = (actual.float() - ref_fp32.float()).abs().max()
    err_ref = (ref_lowp.float() - ref_fp32.float()).abs().max()
    assert err <= factor * err_ref + ulp, f"error {err:.3g} > {factor} x reference error {err_ref:.3g} + {ulp:.3g}"
