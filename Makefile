# Two commands set everything up on a fresh machine:
#   make quickstart   - create .venv, install, run the tiny end-to-end job on CPU
#   make test         - create .venv, install with [dev], run the test suite
# TORCH selects the torch requirement. On a machine without nvidia-smi it defaults to the CPU wheel
# torch==2.13.0 (a bare `torch` would pull a multi-GB CUDA build); override e.g. `make test TORCH='torch>=2.11'`.
PYTHON ?= python3
VENV ?= .venv
TRITON ?= triton==3.6.0
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH ?= torch==2.13.0
else
TORCH ?= torch>=2.11
endif
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv install install-dev quickstart test lint clean bench-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: $(PY)

install: $(PY)
	$(PY) -m pip install --quiet "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install --quiet -e .

install-dev: $(PY)
	$(PY) -m pip install --quiet "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install --quiet -e ".[dev]"

quickstart: install
	$(VENV)/bin/fspo-engine quickstart

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .

# Peer libraries for `bench kernels` on the GPU machine, which has no package registry: pure-Python wheels
# committed in benchmarks/wheels/ (benchmarks/gpu_check.sh installs them with --no-index). This refreshes them.
bench-wheels: $(PY)
	rm -f benchmarks/wheels/*.whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d benchmarks/wheels \
		liger-kernel==0.8.5 cut-cross-entropy==25.1.1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
