"""The shared benchmark harness: device, timing, bandwidth, memory and phase breakdown.

Every suite times the same way: a round runs the measured call ``inner`` times and then
waits for the device, ``inner`` chosen so that one round lasts a few milliseconds (so
the launch queue stays full and the final synchronisation is a small part of the
round); the reported time is the median round over ``inner``. Nothing here queries CUDA
at import time: the device is decided when a benchmark runs.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import time
from collections import defaultdict
from typing import Callable, Optional

import torch

# Sizes of the kernel-level suite, in elements. The CPU sizes keep a run of the whole
# suite within a few minutes on two cores.
GPU_KERNEL_SIZES = (1 << 20, 16 << 20, 64 << 20, 100_000_000)
CPU_KERNEL_SIZES = (1 << 16, 1 << 20)
KERNEL_SIZES = tuple(sorted(set(GPU_KERNEL_SIZES + CPU_KERNEL_SIZES)))
# Elements of the tensor whose device-to-device copy sets the bandwidth ceiling.
COPY_NUMEL = {"cuda": 256 << 20, "cpu": 16 << 20}

# Minimum memory traffic of one fused update, in tensor passes (reads + writes), per
# dynamics, with an HVP present: SGD reads w, g, hz, Zw and writes w, Zw; SGDM adds the
# momentum v and its tangent Zv (read and written); Adam/AdamW add m, v, Zm, Zv.
MIN_PASSES = {"sgd": 4 + 2, "sgdm": 6 + 4, "adam": 8 + 6, "adamw": 8 + 6}


def device() -> torch.device:
    """The benchmark device: the current CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def quick() -> bool:
    """MARTHE_BENCH_QUICK=1: few rounds (dry runs of the pipeline, not numbers to keep)."""
    return os.environ.get("MARTHE_BENCH_QUICK") == "1"


def cpu_threads() -> int:
    """Torch threads for CPU runs: $MARTHE_BENCH_THREADS, default 1.

    On a machine whose cores are shared, OpenMP worker threads spin and wait for each
    other: the MLP's plain step took 570 ms with 2 threads and 42 ms with 1 on the
    2-core development machine (2026-11-28, other jobs running).
    """
    return int(os.environ.get("MARTHE_BENCH_THREADS", "1"))


def budget_s(dev: torch.device, suite: str) -> float:
    """Seconds of measurement per benchmark case (after warm-up)."""
    if quick():
        return 0.05
    if dev.type == "cuda":
        return 0.25 if suite == "kernel" else 0.4
    return 0.4 if suite == "kernel" else 0.8


def _plan(fn: Callable[[], object], dev: torch.device, budget: float,
          target_round_s: float = 2e-3, warmup: int = 2) -> tuple[int, int]:
    """Warm up, then choose (inner calls per round, rounds) to fill ``budget`` seconds."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    est = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(target_round_s / est)))
    rounds = max(3, min(200, int(budget / (est * inner))))
    return inner, rounds


def measure(fn: Callable[[], object], dev: torch.device, budget: float) -> float:
    """Median seconds per call of ``fn``, without pytest-benchmark (same method)."""
    inner, rounds = _plan(fn, dev, budget)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(dev)
        times.append((time.perf_counter() - t0) / inner)
    times.sort()
    return times[len(times) // 2]


def run(benchmark, fn: Callable[[], object], dev: torch.device, budget: float) -> Optional[float]:
    """Time ``fn`` with pytest-benchmark; returns the median seconds per call.

    Returns None when benchmarking is disabled (``--benchmark-disable`` runs each case
    once, as a test).
    """
    if getattr(benchmark, "disabled", False):
        benchmark(fn)
        return None
    inner, rounds = _plan(fn, dev, budget)

    def one_round():
        for _ in range(inner):
            fn()
        sync(dev)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / inner
    benchmark.extra_info.update(inner=inner, rounds=rounds, time_s=seconds)
    return seconds


def copy_bandwidth(dev: torch.device, numel: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    numel = numel or COPY_NUMEL[dev.type]
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), dev, 0.5 if dev.type == "cuda" else 1.0)
    return 2 * numel * src.element_size() / seconds


def fresh_memory(dev: torch.device) -> None:
    """Free what earlier cases left, so that one case's memory does not count in the next."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def allocated(dev: torch.device) -> Optional[int]:
    if dev.type != "cuda":
        return None
    sync(dev)
    return torch.cuda.memory_allocated(dev)


def peak_extra_bytes(fn: Callable[[], object], dev: torch.device, base: Optional[int]) -> Optional[int]:
    """Peak allocated memory during one call of ``fn``, above ``base`` bytes (CUDA only).

    The CPU allocator keeps no such statistics (and tracemalloc does not see torch's
    allocations), so CPU runs report None.
    """
    if dev.type != "cuda" or base is None:
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


class _Clock:
    """Device-side time stamps on CUDA (events), host time on the CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


@contextlib.contextmanager
def phase_timing(dev: torch.device):
    """Time the NVTX phases of ``Marthe.step`` ("gradient", "hvp", "fused_update", ...).

    Yields ``(marks, clock)``: ``marks`` collects (name, start, end) stamps; turn them into
    seconds with :func:`phase_seconds` after the device has finished. The library's
    ``marthe_ext._profiling.phase`` is wrapped for the duration (NVTX ranges, when
    enabled, are still pushed), since it is the one place that knows the phases.
    """
    from marthe_ext import _profiling

    clock = _Clock(dev)
    marks: list = []
    original = _profiling.phase

    @contextlib.contextmanager
    def timed(name: str):
        with original(name):
            start = clock.stamp()
            try:
                yield
            finally:
                marks.append((name, start, clock.stamp()))

    _profiling.phase = timed
    try:
        yield marks, clock
    finally:
        _profiling.phase = original


def phase_seconds(marks, clock: _Clock) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for name, start, end in marks:
        totals[name] += clock.seconds(start, end)
    return dict(totals)


def step_breakdown(step: Callable[[], object], dev: torch.device, steps: int = 5) -> dict[str, float]:
    """Seconds per step spent in each phase of ``Marthe.step`` and in the rest ("other")."""
    clock = _Clock(dev)
    with phase_timing(dev) as (marks, _):
        sync(dev)
        start = clock.stamp()
        for _ in range(steps):
            step()
        end = clock.stamp()
        sync(dev)
    per_phase = {k: v / steps for k, v in phase_seconds(marks, clock).items()}
    total = clock.seconds(start, end) / steps
    per_phase["other"] = max(total - sum(per_phase.values()), 0.0)
    per_phase["total"] = total
    return per_phase


def environment(dev: Optional[torch.device] = None) -> dict:
    """Versions and the device, for the header of the results table."""
    dev = dev or device()
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # the table says why instead of failing the run
        triton_version = f"unavailable ({type(exc).__name__})"
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device_type": dev.type,
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
    else:
        threads = torch.get_num_threads()
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}), " \
                              f"{threads} torch thread{'s' if threads != 1 else ''}, no GPU"
    return info
