"""Test session setup.

Triton runs on CPU tensors through its interpreter; the variable must be set before the
first ``import triton``. A GPU run (benchmarks/gpu_check.sh) sets MARTHE_GPU_TESTS=1 and
runs the compiled kernels instead. No CUDA query happens at import or collection time.
"""
import os

if os.environ.get("MARTHE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The experiment framework (python/marthe_experiments) is a source-tree package, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


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


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and many times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
