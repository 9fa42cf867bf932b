"""Test session setup.

Triton runs on CPU tensors through its interpreter; the variable must be set before the
first ``import triton``. A GPU run (benchmarks/gpu_check.sh) sets MARTHE_GPU_TESTS=1 and
runs the compiled kernels instead. No CUDA query happens at import or collection time.
"""
import os

if os.environ.get("MARTHE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MARTHE_GPU_TESTS") == "1":
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: set MARTHE_GPU_TESTS=1 on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
