"""Build script. The package metadata lives in pyproject.toml; the CUDA extension
(``csrc/``, built with CMake + pybind11 + nvcc when a toolkit is present) is added here
when it exists."""

from setuptools import setup

setup()
