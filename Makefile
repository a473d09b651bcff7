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

.PHONY: venv install install-dev quickstart test lint clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
