"""Fixtures shared by the benchmark suites (``pytest benchmarks/ --benchmark-only``).

The device is decided when the first benchmark runs (CUDA when present, else the CPU
with reduced sizes); the copy bandwidth is measured once per run and written, with the
versions and the device, into the JSON's ``machine_info`` for the results table.
"""
from __future__ import annotations

import os

import pytest

from benchmarks import harness

_RUN_INFO: dict = {}


@pytest.fixture(scope="session")
def dev():
    import torch

    device = harness.device()
    if device.type == "cpu":
        torch.set_num_threads(harness.cpu_threads())
    _RUN_INFO.update(harness.environment(device))
    return device


@pytest.fixture(scope="session")
def copy_bw(dev):
    """Device-to-device copy bandwidth (bytes/s), measured once in this run."""
    bw = harness.copy_bandwidth(dev)
    _RUN_INFO["copy_gbps"] = bw / 1e9
    return bw


def load_or_skip(name: str, dev):
    """The backend ``name`` for ``dev``, or skip the case with the reason."""
    from marthe_ext.backends import BackendUnavailable, load_backend

    if name == "triton" and (dev.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton runs here only through its interpreter (TRITON_INTERPRET=1 or no "
                    "GPU): its timings would be meaningless")
    if name == "cuda" and dev.type != "cuda":
        pytest.skip("the CUDA backend needs a CUDA device")
    if name == "cpu" and dev.type == "cuda":
        pytest.skip("the compiled CPU backend is benchmarked in CPU runs; this run is on the GPU")
    if name in os.environ.get("MARTHE_BENCH_SKIP", "").split(","):
        # Set by the GPU check when a backend failed to build or run: skip it here instead
        # of retrying the build in every process.
        pytest.skip(f"backend {name!r} failed the GPU check's build stage (see its log)")
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def fast_backend_name(dev) -> str:
    """The backend the engine-variant cases use: the first that loads, fastest first."""
    from marthe_ext.backends import BackendUnavailable, load_backend

    order = ("triton", "cuda", "torch") if dev.type == "cuda" else ("cpu", "torch")
    skipped = os.environ.get("MARTHE_BENCH_SKIP", "").split(",")
    for name in order:
        if name in skipped or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        try:
            load_backend(name)
            return name
        except BackendUnavailable:
            continue
    return "torch"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["marthe"] = dict(_RUN_INFO)
