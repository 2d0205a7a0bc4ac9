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

# Under pytest-xdist each worker gets one intra-op thread: two workers on a 2-core
# machine each spawning a full thread pool fight for the cores (10-20x slower steps).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
