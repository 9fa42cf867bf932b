"""Run one backend's fused update for Nsight Compute (and optionally time it).

    ncu --clock-control none --profile-from-start off \\
        python benchmarks/profile_kernel.py --backend triton --dynamics adam --numel 67108864

Builds one random parameter group (the kernel suite's layout), warms the backend up
(compilation, pointer tables), then runs ``--calls`` updates between
``cudaProfilerStart`` / ``cudaProfilerStop``: with ``--profile-from-start off`` the
profiler sees exactly those kernels. ``--time`` also prints the median time and the
bandwidth against the copy bandwidth (without a profiler attached).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="triton", help="torch | triton | cuda | cpu")
    p.add_argument("--dynamics", choices=("sgd", "sgdm", "adam", "adamw"), default="adam")
    p.add_argument("--numel", type=int, default=16 << 20)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--time", action="store_true", help="print time and bandwidth too")
    args = p.parse_args(argv)

    import torch

    from benchmarks import harness
    from benchmarks.workloads import fused_call, make_buffers
    from marthe_ext.backends import load_backend

    dev = harness.device()
    backend = load_backend(args.backend)
    fn = fused_call(backend, args.dynamics, make_buffers(args.dynamics, args.numel, dev), dev)
    for _ in range(3):
        fn()
    harness.sync(dev)
    if dev.type == "cuda":
        torch.cuda.profiler.start()
    for _ in range(args.calls):
        fn()
    harness.sync(dev)
    if dev.type == "cuda":
        torch.cuda.profiler.stop()
    if args.time:
        seconds = harness.measure(fn, dev, 0.5)
        gbps = harness.MIN_PASSES[args.dynamics] * args.numel * 4 / seconds / 1e9
        copy = harness.copy_bandwidth(dev) / 1e9
        print(f"{args.backend} {args.dynamics} n={args.numel}: {seconds * 1e6:.1f} us, "
              f"{gbps:.0f} GB/s = {100 * gbps / copy:.0f}% of copy ({copy:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
