"""Investigation (issue 7): can torch.compile make gradient + HVP cheaper than our engines?

For each model, in one run, side by side:

* ``grad``            one plain training gradient (the unit of every ratio);
* ``reverse``         the library's double-backward engine (``marthe_ext.hvp``);
* ``forward``         the library's forward-over-reverse engine (dual parameters);
* ``func``            ``torch.func.jvp(torch.func.grad(f))`` with ``functional_call`` and
                      the buffers passed explicitly, cloned inside the transformed
                      function and returned as its auxiliary output (BatchNorm in train
                      mode updates them in place, which the transforms refuse on captured
                      tensors; the returned copies hold exactly one step's update);
* ``func+compile``    the same function under ``torch.compile``;
* ``reverse+compile`` the double-backward function under ``torch.compile``;
* ``reverse+graph``   the double-backward function captured once in a CUDA graph and
                      replayed (for launch-bound small models; CUDA only).

Each line reports the median time, its ratio to ``grad``, the first call's time (the
compilation), and the largest relative difference of (grad, H Zw) from the reverse
engine; a variant that fails records its error instead. Results print as a markdown
table and, with ``--json``, are saved.

    python benchmarks/compile_hvp.py [--models mlp,vgg11,resnet18] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from benchmarks import harness
from benchmarks.models import MODELS, model_spec, random_batch
from marthe_ext.hvp import ENGINES


def _rel(a, b) -> float:
    num = max(float((x - y).detach().norm()) for x, y in zip(a, b))
    den = max(float(y.detach().norm()) for y in b)
    return num / max(den, 1e-30)


def variants(model, x, y, params, tangents):
    """name -> a function returning (grads, hvps), all over the same model and batch."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())

    def closure():
        return F.cross_entropy(model(x), y)

    def engine(name):
        def run():
            _, g, h = ENGINES[name](closure, params, tangents, True, model)
            return g, h
        return run

    def plain_grad():
        return torch.autograd.grad(closure(), params), None

    def loss_of(p, b):
        return F.cross_entropy(functional_call(model, (p, b), (x,)), y)

    def loss_and_buffers(p, b):
        b = {k: v.clone() for k, v in b.items()}  # updated in place by BatchNorm: returned
        return loss_of(p, b), b

    def func_hvp(p, t, b):
        g, h, _new_buffers = jvp(lambda q: grad(loss_and_buffers, has_aux=True)(q, b), (p,), (t,),
                                 has_aux=True)
        return g, h

    compiled_func = torch.compile(func_hvp, dynamic=False)

    def func_run(fn):
        def run():
            p = dict(zip(names, params))
            t = dict(zip(names, tangents))
            g, h = fn(p, t, buffers)
            return [g[n] for n in names], [h[n] for n in names]
        return run

    def double_backward(*ps):
        loss = loss_of(dict(zip(names, ps)), buffers)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        h = torch.autograd.grad(g, ps, grad_outputs=tangents)
        return g, h

    compiled_double = torch.compile(double_backward, dynamic=False)

    return {
        "grad": plain_grad,
        "reverse": engine("reverse"),
        "forward": engine("forward"),
        "func": func_run(func_hvp),
        # Slowest to set up last: a run cut short by a time limit keeps the rows before.
        "reverse+graph": cuda_graphed(lambda: double_backward(*params), params[0].device),
        "reverse+compile": lambda: compiled_double(*params),
        "func+compile": func_run(compiled_func),
    }


def cuda_graphed(fn, dev):
    """``fn`` captured in a CUDA graph on its first call (after a warm-up on a side stream,
    as torch.cuda.graph requires) and replayed after; its outputs are the graph's static
    tensors. Inputs must keep their storage: parameters and tangents are updated in place."""
    state = {}

    def run():
        if dev.type != "cuda":
            raise RuntimeError("skipped: CUDA graphs need a CUDA device")
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = fn()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    return run


def _mib(n):
    return None if n is None else n / 2 ** 20


def measure(name: str, fn, dev, reference, rounds: int) -> dict:
    row = dict(variant=name)
    try:
        start = time.perf_counter()
        out = fn()
        harness.sync(dev)
        row["first_call_s"] = time.perf_counter() - start
        if reference is not None and out[1] is not None:
            row["rel_err_grad"] = _rel(out[0], reference[0])
            row["rel_err_hvp"] = _rel(out[1], reference[1])
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            harness.sync(dev)
            times.append(time.perf_counter() - start)
        row["median_s"] = statistics.median(times)
        harness.fresh_memory(dev)
        row["peak_extra_mib"] = _mib(harness.peak_extra_bytes(fn, dev, harness.allocated(dev)))
    except Exception as exc:  # noqa: BLE001 - the investigation records what fails and why
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def run_model(name: str, dev, rounds: int, report=None) -> list[dict]:
    """Every variant on one model; ``report(row)`` is called as each row is done."""
    spec = model_spec(name, reduced=dev.type == "cpu")
    torch.manual_seed(0)
    model = spec.build().to(dev).train()
    x, y = random_batch(spec, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    tangents = [torch.randn_like(p) * 1e-2 for p in params]
    fns = variants(model, x, y, params, tangents)
    reference = fns["reverse"]()
    rows, base = [], None
    for v, fn in fns.items():
        row = dict(measure(v, fn, dev, reference, rounds), model=name)
        base = row.get("median_s") if v == "grad" else base
        if "median_s" in row and base:
            row["ratio_to_grad"] = row["median_s"] / base
        rows.append(row)
        if report is not None:
            report(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | variant | median ms | x grad | peak extra MiB | first call s | rel err grad | "
           "rel err HVP | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else ""
        ms = format(r["median_s"] * 1e3, ".1f") if "median_s" in r else ""
        mib = "" if r.get("peak_extra_mib") is None else format(r["peak_extra_mib"], ".0f")
        out.append(f"| {r['model']} | {r['variant']} | {ms} | {f('ratio_to_grad', '.2f')} | {mib} | "
                   f"{f('first_call_s', '.1f')} | {f('rel_err_grad', '.1e')} | {f('rel_err_hvp', '.1e')} | "
                   f"{r.get('error', '')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    dev = harness.device()
    if dev.type == "cpu":
        torch.set_num_threads(harness.cpu_threads())
    env = harness.environment(dev)
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(table([]), flush=True)
    rows = []
    for name in args.models.split(","):  # rows print as they finish (a time limit keeps them)
        rows += run_model(name, dev, args.rounds, report=lambda r: print(table([r]).splitlines()[-1], flush=True))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
