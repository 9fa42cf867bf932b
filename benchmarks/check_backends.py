"""Load (building if needed) every backend for this machine's device and smoke-test it.

    python benchmarks/check_backends.py [--failed-file PATH]

On a CUDA machine: "torch", "triton", "cuda"; on the CPU: "torch", "cpu". Each backend
is loaded (the compiled ones JIT-build on first use and cache the build for later
processes), then runs one small fused update against the torch reference. Prints one
line per backend; ``--failed-file`` receives the names that failed, one per line, so that
the GPU check can skip them in later stages instead of rebuilding in every process.
Exit status 0 even when a backend fails: the caller reads the list.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def smoke(name: str, dev) -> str:
    """Load ``name`` and compare one sgdm update on odd sizes with the reference."""
    import torch

    from benchmarks.workloads import fused_call, make_buffers
    from marthe_ext.backends import load_backend

    backend = load_backend(name)
    ref = load_backend("torch")
    bufs = make_buffers("sgdm", 4097 * 8 + 5, dev)
    want = make_buffers("sgdm", 4097 * 8 + 5, dev)
    fused_call(backend, "sgdm", bufs, dev)()
    fused_call(ref, "sgdm", want, dev)()
    for a, b in zip(bufs.params + bufs.tangents, want.params + want.tangents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return backend.name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--failed-file", help="write the names of the failed backends here")
    args = p.parse_args(argv)

    from benchmarks import harness

    dev = harness.device()
    names = ("torch", "triton", "cuda") if dev.type == "cuda" else ("torch", "cpu")
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            smoke(name, dev)
            print(f"backend {name:<7} ok      ({time.perf_counter() - t0:.1f} s, load + smoke test)")
        except Exception as exc:  # report every failure, keep checking the others
            failed.append(name)
            print(f"backend {name:<7} FAILED  ({time.perf_counter() - t0:.1f} s): "
                  f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
    if args.failed_file:
        Path(args.failed_file).write_text("".join(f"{n}\n" for n in failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
