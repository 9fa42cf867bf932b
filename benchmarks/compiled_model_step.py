"""What a MARTHE step costs when the closure calls a ``torch.compile``d model (issue 13).

One run, side by side, a full ``opt.step`` (sgdm, mu = 0.99) on the same batch:

* ``eager  reverse``          the eager model, double backward (the reference);
* ``eager  fd``               the eager model, finite-difference HVP;
* ``compiled reverse-eager``  the compiled model; the HVP step runs it eagerly
                              (``torch.compiler.set_stance("force_eager")``);
* ``compiled fd``             the compiled model: two compiled gradients;
* ``eager  mu=0`` / ``compiled mu=0``  HD: one gradient, no HVP (what compiling buys
                              a first-order step).

Each row: the median over rounds of the milliseconds per step and its ratio to ``eager reverse``. The
exactness of ``reverse-eager`` is a test (tests/test_compiled.py), not timed here.

    python benchmarks/compiled_model_step.py [--model mlp] [--batch 100]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.models import model_spec, random_batch
import marthe_ext

CASES = (("eager", "reverse", 0.99), ("eager", "fd", 0.99), ("compiled", "reverse-eager", 0.99),
         ("compiled", "fd", 0.99), ("eager", "reverse", 0.0), ("compiled", "reverse", 0.0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds over all cases")
    args = ap.parse_args(argv)
    dev = harness.device()
    spec = model_spec(args.model, reduced=dev.type == "cpu")
    torch.manual_seed(0)
    base = spec.build().to(dev)
    x, y = random_batch(spec, dev, generator=torch.Generator().manual_seed(1), batch=args.batch)

    steps = {}
    for kind, engine, mu in CASES:
        model = copy.deepcopy(base)
        forward = torch.compile(model) if kind == "compiled" else model
        opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics="sgdm", mu=mu, hvp=engine,
                                model=model)

        def step(opt=opt, forward=forward):
            opt.step(lambda: F.cross_entropy(forward(x), y))

        for _ in range(3):  # the first step (no HVP) and the compilation
            step()
        steps[f"{kind} {engine}" + (" mu=0" if mu == 0 else "")] = step
    # Rounds over all cases in turn, so that the load of a shared machine hits them alike.
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(harness.measure(step, dev, budget=0.05))
    rows = [(name, statistics.median(t)) for name, t in times.items()]
    ref_s = rows[0][1]
    print(f"{spec.name}, batch {x.shape[0]}, {harness.cpu_threads()} CPU threads, torch {torch.__version__}")
    print("| case | ms / step | vs eager reverse |")
    print("|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.2f} | {s / ref_s:.2f} |")


if __name__ == "__main__":
    main()
