"""Run a few training steps of one model for Nsight Systems / Nsight Compute.

    python benchmarks/profile_step.py --model resnet18 --dynamics sgdm --backend triton
    nsys profile --capture-range=cudaProfilerApi --trace=cuda,nvtx -o marthe_step \\
        python benchmarks/profile_step.py --model resnet18
    ncu --clock-control none --profile-from-start off --nvtx \\
        --nvtx-include "marthe.fused_update/" python benchmarks/profile_step.py --steps 1

Warm-up steps run first (first-step state allocation, Triton compilation, cuDNN
plans); the measured steps run between ``cudaProfilerStart`` / ``cudaProfilerStop``, so
a profiler started with a capture range sees only steady-state steps. On CUDA (unless
``--no-nvtx``) the library's NVTX ranges are switched on and every step is a range
``step N`` holding the library's ``marthe.gradient``, ``marthe.hvp``, ``marthe.fused_update`` and
``marthe.hypergradient`` ranges. Without a profiler, the script prints the median step
time and the time per phase (device events on CUDA, host clock on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.models import MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="resnet18")
    p.add_argument("--optimizer", choices=("marthe", "autograd", "plain"), default="marthe",
                   help="marthe_ext.Marthe, the pure-autograd baseline, or a plain torch.optim step")
    p.add_argument("--dynamics", choices=("sgd", "sgdm", "adam", "adamw"), default="sgdm")
    p.add_argument("--backend", default="auto", help="auto | torch | triton | cuda | cpu")
    p.add_argument("--hvp", default="reverse", help="reverse | forward | fd | auto")
    p.add_argument("--hypergrad", default="grad", help="grad | jvp | fd")
    p.add_argument("--train-mode", action="store_true",
                   help="hypergradient from the training loss (no validation closure)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.01 (SGD), 1e-3 (Adam)")
    p.add_argument("--mu", type=float, default=0.99)
    p.add_argument("--hyper-lr", type=float, default=1e-6)
    p.add_argument("--safeguards", default=None, choices=(None, "robust"),
                   help="Marthe's safeguard preset (default: none, the algorithm the autograd baseline runs)")
    p.add_argument("--batch", type=int, default=None, help="default: the model's benchmark batch")
    p.add_argument("--reduced", action="store_true",
                   help="the CPU-sized model (quarter width for the convolutional networks)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-nvtx", action="store_true", help="do not push NVTX ranges")
    return p.parse_args(argv)


@contextlib.contextmanager
def _nvtx(name: str, on: bool):
    import torch

    if not on:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def build(args):
    """(step function, device, optimizer or None) for the chosen configuration."""
    import torch
    from torch.nn import functional as F

    import marthe_ext
    from benchmarks.autograd_baseline import AutogradMarthe
    from benchmarks.models import model_spec, random_batch

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = model_spec(args.model, reduced=args.reduced)
    gen = torch.Generator().manual_seed(0)
    x, y = random_batch(spec, dev, generator=gen, batch=args.batch)
    xv, yv = random_batch(spec, dev, generator=gen, batch=args.batch)
    torch.manual_seed(0)
    model = spec.build().to(dev)
    lr = args.lr if args.lr is not None else (1e-3 if args.dynamics.startswith("adam") else 0.01)

    def closure():
        return F.cross_entropy(model(x), y)

    val = None if args.train_mode else (lambda: F.cross_entropy(model(xv), yv))
    if args.optimizer == "plain":
        params = list(model.parameters())
        opt = (torch.optim.Adam(params, lr=lr) if args.dynamics == "adam"
               else torch.optim.AdamW(params, lr=lr) if args.dynamics == "adamw"
               else torch.optim.SGD(params, lr=lr, momentum=0.9 if args.dynamics == "sgdm" else 0.0))

        def step():
            opt.zero_grad(set_to_none=True)
            closure().backward()
            opt.step()
        return step, dev, None
    if args.optimizer == "autograd":
        opt = AutogradMarthe(model.parameters(), lr=lr, dynamics=args.dynamics, mu=args.mu,
                             hyper_lr=args.hyper_lr)
    else:
        opt = marthe_ext.Marthe(model.parameters(), lr=lr, dynamics=args.dynamics, mu=args.mu,
                                hyper_lr=args.hyper_lr, hvp=args.hvp, hypergrad=args.hypergrad,
                                backend=args.backend, model=model, safeguards=args.safeguards)
    return (lambda: opt.step(closure, val)), dev, opt


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks import harness
    from marthe_ext import _profiling

    torch.set_num_threads(harness.cpu_threads())  # used by CPU runs only
    step, dev, opt = build(args)
    nvtx = not args.no_nvtx and dev.type == "cuda"
    _profiling.enable(nvtx)
    for _ in range(args.warmup):
        step()
    harness.sync(dev)

    if dev.type == "cuda":
        torch.cuda.profiler.start()
    clock = harness._Clock(dev)
    marks = []
    with harness.phase_timing(dev) as (phase_marks, _):
        for i in range(args.steps):
            with _nvtx(f"step {i}", nvtx):
                start = clock.stamp()
                step()
                marks.append((start, clock.stamp()))
        harness.sync(dev)
    if dev.type == "cuda":
        torch.cuda.profiler.stop()

    times = sorted(clock.seconds(a, b) for a, b in marks)
    phases = harness.phase_seconds(phase_marks, clock)
    label = args.optimizer if opt is None or args.optimizer != "marthe" else \
        f"marthe backend={opt.backend} hvp={opt.hvp_engine or args.hvp} hypergrad={args.hypergrad}"
    print(f"{args.model} {args.dynamics} {label} on {dev}: median step "
          f"{times[len(times) // 2] * 1e3:.3f} ms over {args.steps} steps")
    for name, total in phases.items():
        print(f"  {name:<15} {total / args.steps * 1e3:9.3f} ms/step")
    if dev.type == "cuda":
        print(f"  peak allocated {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
