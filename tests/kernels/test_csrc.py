"""``csrc/`` builds for sm_90a with CMake + pybind11 + nvcc (in a temporary directory, as
CI does on machines without a GPU), the module imports, its argument checks raise
``ValueError`` before any CUDA call, and without a GPU a call fails with a CUDA error
instead of crashing. Correctness of the CUDA kernels is tested on a GPU by the op tests
(``backend="cuda"`` in test_causal_conv3d.py / test_group_norm_silu.py)."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def csrc_module(tmp_path_factory):
    """Configure and build csrc/ for sm_90a in a temp dir; import the result."""
    nvcc, cmake = _nvcc(), shutil.which("cmake")
    pybind11 = pytest.importorskip("pybind11")
    if nvcc is None or cmake is None:
        pytest.skip("needs nvcc and cmake")
    # one build per test run: xdist workers share the parent of their base temp dirs and
    # take turns through a lock, the first one builds, the others reuse its module
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    build = root / "mugv-csrc-build"
    out = build / "out"
    with open(root / "mugv-csrc-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not list(out.glob("_C*.so")):
            _build(build, out, nvcc, cmake, pybind11)
    (so,) = out.glob("_C*.so")
    spec = importlib.util.spec_from_file_location("mugv_csrc_build._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, so


def _build(build: Path, out: Path, nvcc: str, cmake: str, pybind11) -> None:
    args = [
        cmake, "-S", str(ROOT), "-B", str(build),
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DMUGV_CUDA_ARCHS=90a",
    ]  # fmt: skip
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    for cmd in (args, [cmake, "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_builds_for_sm90a_and_imports(csrc_module):
    module, so = csrc_module
    assert module.cuda_archs == "90a"
    assert "causal_conv3d_fwd" in module.causal_conv3d_fwd.__doc__
    assert callable(module.group_norm_silu_fwd)
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(_nvcc()), "cuobjdump")
    if os.path.exists(cuobjdump):
        listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True).stdout
        assert "sm_90a" in listing


def _conv_args(**over):
    """Arguments of ``causal_conv3d_fwd`` that pass every check (fake non-null pointers)."""
    args = dict(
        x=256, context=0, weight=512, bias=0, y=768, is_bf16=1, B=1, C_in=8, T=4, H=4, W=4, C_out=8,
        kT=3, kH=3, kW=3, stride_t=1, stride_h=1, stride_w=1, dil_t=1, dil_h=1, dil_w=1, front=2,
        pad_h=1, pad_w=1, T_out=4, H_out=4, W_out=4, P=0, replicate=False, stream=0,
    )  # fmt: skip
    args.update(over)
    return args


def _gn_args(**over):
    args = dict(
        x=256, y=512, weight=0, bias=0, mean=768, rstd=1024, dtype=2, B=1, C=8, S=16, G=4,
        sxb=128, sxc=16, sxs=1, syb=128, syc=16, sys=1, eps=1e-6, silu=True, stream=0,
    )  # fmt: skip
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(x=0), "x must be a device pointer"),
        (dict(kH=2), "spatial kernel sizes must be odd"),
        (dict(stride_t=0), "stride_t must be positive"),
        (dict(context=1024, P=1), "context must hold P == front frames"),
        (dict(is_bf16=0, C_in=0), "C_in must be positive"),
    ],
)
def test_conv_checks_raise_value_error(csrc_module, over, match):
    module, _ = csrc_module
    with pytest.raises(ValueError, match=match):
        module.causal_conv3d_fwd(**_conv_args(**over))


@pytest.mark.parametrize(
    "over, match",
    [(dict(G=3), "num_groups must divide C"), (dict(dtype=7, S=0), "S must be positive"), (dict(mean=0), "mean must be")],
)
def test_group_norm_checks_raise_value_error(csrc_module, over, match):
    module, _ = csrc_module
    with pytest.raises(ValueError, match=match):
        module.group_norm_silu_fwd(**_gn_args(**over))


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_call_without_gpu_is_a_cuda_error(csrc_module):
    """Valid arguments on a machine without a driver: a RuntimeError, not a crash."""
    module, _ = csrc_module
    with pytest.raises(RuntimeError, match="failed"):
        module.group_norm_silu_fwd(**_gn_args())
    with pytest.raises(RuntimeError, match="failed"):
        module.causal_conv3d_fwd(**_conv_args())


def test_setup_rejects_bad_build_mode():
    env = dict(os.environ, MUGV_BUILD_CUDA="maybe")
    proc = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "MUGV_BUILD_CUDA must be auto, 0 or 1" in proc.stderr
