"""Kernel level: one fused update (SPEC section 2, step 4) per backend, and the same
elementwise work done the pure-autograd way (flatten with torch.cat, torch.optim step,
tangent arithmetic as separate ops on flat vectors).

Reported per case: the median time per update, the bandwidth counting the minimum
bytes (``harness.MIN_PASSES`` passes over the float32 data), and that bandwidth as a
fraction of the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness
from benchmarks.conftest import load_or_skip
from benchmarks.workloads import DYNAMICS, IMPLS, autograd_call, fused_call, make_buffers

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("numel", harness.KERNEL_SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_update(benchmark, impl, dynamics, numel, dev, copy_bw):
    sizes = harness.GPU_KERNEL_SIZES if dev.type == "cuda" else harness.CPU_KERNEL_SIZES
    if numel not in sizes:
        pytest.skip(f"{numel} elements is a {'CPU' if dev.type == 'cuda' else 'GPU'}-run size "
                    f"(this run: {', '.join(map(str, sizes))})")
    harness.fresh_memory(dev)
    if impl == "autograd":
        backend_name = "autograd"
        bufs = make_buffers(dynamics, numel, dev)
        fn = autograd_call(dynamics, bufs)
    else:
        backend = load_or_skip(impl, dev)
        backend_name = backend.name
        bufs = make_buffers(dynamics, numel, dev)
        fn = fused_call(backend, dynamics, bufs, dev)

    benchmark.group = f"fused_update {dynamics} n={numel}"
    min_bytes = harness.MIN_PASSES[dynamics] * numel * 4
    benchmark.extra_info.update(suite="kernel", impl=impl, backend=backend_name,
                                dynamics=dynamics, numel=numel, min_bytes=min_bytes,
                                copy_gbps=copy_bw / 1e9)
    seconds = harness.run(benchmark, fn, dev, harness.budget_s(dev, "kernel"))
    if seconds is not None:
        gbps = min_bytes / seconds / 1e9
        benchmark.extra_info.update(gbps=gbps, copy_fraction=gbps * 1e9 / copy_bw)
        assert all(torch.isfinite(p).all() for p in bufs.params[:1])
