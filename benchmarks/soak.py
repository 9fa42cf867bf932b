"""Soak: many MARTHE steps of a small model on the CPU, checking that nothing accumulates.

    python -m benchmarks.soak --steps 10000                   # default and safeguards=None
    python -m benchmarks.soak --steps 300 --backend triton    # (TRITON_INTERPRET=1)

Per run it checks, after a warm-up:
* process memory (resident set, /proc/self/statm) is flat: growth under 1 %;
* no autograd graph outlives its step: every activation of the step (which the graphs
  save for backward) is freed by the end of it (weak references from forward hooks), and
  no weight, state, tangent or hyper-scalar carries a ``grad_fn``;
* the backend's tables stop growing (Triton; the other backends have none): the chunk
  layouts and constant tensors are built during warm-up and never again, and the cached
  pointer rows stay within the cache's capacity (fresh gradients come at new addresses
  on the CPU, so their rows are rebuilt, and evicted, every step);
* eta stays finite and positive.
tests/test_soak.py runs a short version; the long one's result is recorded in the README.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import time
import weakref

import torch
from torch import nn

import marthe_ext

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The current resident set size (Linux), else the peak (what getrusage offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class GraphTracker:
    """Weak references to every activation the model produces while tracking.

    The layers save their inputs (earlier layers' outputs) for backward, so while any
    graph of a step is alive, some of that step's activations are too. (A saved-tensors
    hook cannot be used: holding the tensors it is given would itself create reference
    cycles through the graph, and detaching them would break the double backward.)
    """

    def __init__(self, model: nn.Module):
        self._refs: list[weakref.ref] = []
        self._handles = [m.register_forward_hook(self._record) for m in model.modules()
                         if m is not model]

    def _record(self, module, inputs, output):
        if isinstance(output, torch.Tensor):
            self._refs.append(weakref.ref(output))

    def alive(self) -> int:
        """Activations still alive (collect garbage first); forgets the dead ones."""
        self._refs = [r for r in self._refs if r() is not None]
        return len(self._refs)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _batches(step: int):
    g = torch.Generator().manual_seed(step % 64)  # a small fixed data set, cycled
    x, xv = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    y, yv = torch.randint(0, 4, (32,), generator=g), torch.randint(0, 4, (32,), generator=g)
    return x, y, xv, yv


def soak(steps: int, safeguards="robust", backend: str = "auto", dynamics: str = "sgdm",
         warmup: int | None = None, samples: int = 50) -> dict:
    """Run ``steps`` steps; return the measurements (see the module docstring)."""
    warmup = warmup if warmup is not None else max(1, steps // 10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 4))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics=dynamics, mu=0.99,
                            weight_decay=1e-4, grad_clip=10.0, backend=backend,
                            safeguards=safeguards,
                            hyper_lr=1e-3 if safeguards else 1e-7)
    loss_fn = nn.functional.cross_entropy
    tracker = GraphTracker(model)
    every = max(1, (steps - warmup) // samples)
    rss, tables, etas, leaked, graph_fns = [], [], [], 0, 0
    base_rss = base_tables = None
    t0 = time.perf_counter()
    for step in range(steps):
        x, y, xv, yv = _batches(step)
        opt.step(lambda: loss_fn(model(x), y), val_closure=lambda: loss_fn(model(xv), yv))
        if step + 1 == warmup or (step + 1 > warmup and (step + 1 - warmup) % every == 0):
            gc.collect()
            leaked = max(leaked, tracker.alive())
            graph_fns = max(graph_fns, _tensors_with_grad_fn(model, opt))
            eta = opt.lr
            etas.append(eta)
            r, tb = rss_bytes(), _table_sizes(opt._protocol.backend)
            if step + 1 == warmup:
                base_rss, base_tables = r, tb
            rss.append(r)
            tables.append(tb)
    seconds = time.perf_counter() - t0
    tracker.close()
    return dict(
        steps=steps, warmup=warmup, safeguards=safeguards, backend=opt.backend,
        dynamics=dynamics, seconds=round(seconds, 1),
        ms_per_step=round(1e3 * seconds / steps, 2),
        rss_base_mib=round(base_rss / 2 ** 20, 1),
        rss_growth=round((max(rss) - base_rss) / base_rss, 5),
        activations_alive=leaked, tensors_with_grad_fn=graph_fns,
        tables_at_warmup=base_tables, tables_at_end=tables[-1],
        rows_max=max((t["rows"] for t in tables if t), default=None),
        eta_first=etas[0], eta_last=etas[-1],
        eta_finite=all(math.isfinite(e) and e > 0 for e in etas),
        skipped_steps=opt.skipped_steps,
    )


def _table_sizes(backend):
    """Cached tables of a Triton backend: chunk layouts + constants, pointer rows, capacity."""
    cache = getattr(backend, "_tables", None)
    if cache is None:
        return None
    return dict(static=len(cache._layouts) + len(cache._consts), rows=len(cache._rows),
                capacity=cache.capacity)


def _tensors_with_grad_fn(model, opt) -> int:
    tensors = list(model.parameters()) + list(opt.hyper_state().values())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.grad_fn is not None for t in tensors)


def check(result: dict, max_growth: float = 0.01) -> list[str]:
    """The failed checks of one run, as messages (empty: all passed)."""
    bad = []
    if result["rss_growth"] >= max_growth:
        bad.append(f"resident memory grew {100 * result['rss_growth']:.2f} % after warm-up")
    if result["activations_alive"]:
        bad.append(f"{result['activations_alive']} activations outlived their step (an "
                   f"autograd graph is kept alive)")
    if result["tensors_with_grad_fn"]:
        bad.append(f"{result['tensors_with_grad_fn']} weights/state/scalars carry a grad_fn")
    start, end = result["tables_at_warmup"], result["tables_at_end"]
    if start is not None and end["static"] != start["static"]:
        bad.append(f"chunk layouts/constants grew from {start['static']} to {end['static']} "
                   f"after warm-up")
    if start is not None and result["rows_max"] > start["capacity"]:
        bad.append(f"{result['rows_max']} pointer rows cached, capacity {start['capacity']}")
    if not result["eta_finite"]:
        bad.append(f"eta left (0, inf): last {result['eta_last']}")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dynamics", default="sgdm")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results, failed = [], False
    for safeguards in ("robust", None):
        r = soak(args.steps, safeguards, args.backend, args.dynamics)
        r["failures"] = check(r)
        failed |= bool(r["failures"])
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
