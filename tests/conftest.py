"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must be set
before triton.jit decorates anything, so it is set here, before any test module imports the kernels.
"""
import os
import sys
from pathlib import Path

import torch

# The dev-only modules (transformers oracle, benchmark harness, baselines) live in benchmarks/, not in
# the product packages; tests import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible to torch)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold the names of parent folders, so a
        # checkout in a folder named "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)"))
