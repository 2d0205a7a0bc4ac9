"""Build script. The package metadata lives in pyproject.toml; this file only adds the
CUDA extension ``mugv_kernels._C`` (``csrc/``, built by ``CMakeLists.txt`` with pybind11 +
nvcc, no torch).

``MUGV_BUILD_CUDA``: ``auto`` (default: build when nvcc is found; a failed build warns and
the package installs without it), ``0`` (skip), ``1`` (build or fail loudly).
``MUGV_CUDA_ARCHS`` (default ``90a``, e.g. ``"80;90a"``), ``MAX_JOBS`` (parallel compile jobs).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
MODE = os.environ.get("MUGV_BUILD_CUDA", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    raise ValueError(f"MUGV_BUILD_CUDA must be auto, 0 or 1, got {MODE!r}")


def find_nvcc() -> str | None:
    """``$CUDACXX``, ``nvcc`` on PATH, or ``$CUDA_HOME/bin/nvcc`` (default /usr/local/cuda)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), os.path.join(cuda_home, "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt instead of setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except Exception as exc:  # auto: the Triton/reference backends work without _C
                if MODE == "1":
                    raise
                print(f"warning: {ext.name} not built ({exc}); set MUGV_BUILD_CUDA=1 to fail loudly", file=sys.stderr)
        self.extensions = built

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDACXX or CUDA_HOME)")
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "csrc"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DMUGV_CUDA_ARCHS={os.environ.get('MUGV_CUDA_ARCHS', '90a')}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(min(os.cpu_count() or 1, 8))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[] if MODE == "0" else [CMakeExtension("mugv_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
