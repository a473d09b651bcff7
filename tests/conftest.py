"""Test-wide setup: the Triton interpreter on machines without CUDA, GPU marker skipping."""

import os

import pytest
import torch

# Must happen before anything imports triton: the kernels then run in the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_attention_timing(monkeypatch):
    # On GPU, attention tile sizes are timed on first use per shape: 18 candidates compiled per head dim
    # and dtype, minutes over the suite. Tests take the first candidate that launches instead;
    # tests/kernels/test_attention.py::test_gpu_autotuned covers the timed choice.
    monkeypatch.setenv("FSPO_ATTN_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
