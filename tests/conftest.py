"""Test-wide setup: the Triton interpreter on machines without CUDA, GPU marker skipping."""

import os

import pytest
import torch

# Must happen before anything imports triton: the kernels then run in the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
