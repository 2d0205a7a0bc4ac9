"""Session-wide test setup (tests/ and benchmarks/).

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors:
``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created, so it
is set here, before anything imports ``mugv_kernels``. On a GPU machine the benchmarks
run the compiled kernels (tests/conftest.py still interprets CPU tensors).
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mugv-inductor-"))
