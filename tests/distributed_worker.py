"""Worker side of test_distributed.py: tiny problems run on 1 (the reference, in the test
process) or N gloo ranks (spawned), results saved for the test to compare.

The global batch is fixed (GLOBAL_BATCH rows per step); rank r of N takes rows
[r * B, (r + 1) * B) with B = GLOBAL_BATCH / N, so N ranks see exactly the one-process batch.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import marthe_ext
import marthe_ext.distributed

GLOBAL_BATCH = 12  # divisible by 2 and 3
D_IN = 3
# How long a rank waits for a peer that stopped calling collectives: short in the failure
# scenario's group (the test's bound), generous in the default group, where a rank starved
# of CPU on a busy machine must not fail a healthy run.
GLOO_TIMEOUT_S = 5
INIT_TIMEOUT_S = 120


class Branchy(nn.Module):
    """A head only some samples use (rank 0's in a 2- or 3-rank split) and a layer nobody uses:
    gradients that exist on some ranks only, and on none."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D_IN, 4)
        self.head = nn.Linear(4, 1)
        self.extra = nn.Linear(D_IN, 1)
        self.never = nn.Linear(D_IN, 1)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x)))
        flag = (x[:, 0] > 10).to(x.dtype)  # the data marks the samples that use `extra`
        if bool(flag.any()):
            out = out + flag[:, None] * self.extra(x)
        return out


def sq_loss(out, y):
    # not F.mse_loss: forward-over-reverse through its backward raises "ZeroTensors are
    # immutable" (torch 2.13), which would hide what these tests are about
    return (out - y).pow(2).mean()


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(D_IN, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    if kind == "deep":  # many parameter tensors: collectives must not grow with them
        layers = [m for _ in range(20) for m in (nn.Linear(D_IN, D_IN), nn.Tanh())]
        return nn.Sequential(*layers, nn.Linear(D_IN, 1)).double()
    if kind == "branchy":
        return Branchy().double()
    raise ValueError(kind)


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, GLOBAL_BATCH, D_IN, generator=g, dtype=torch.float64)
    y = torch.randn(steps, GLOBAL_BATCH, 1, generator=g, dtype=torch.float64)
    # Branchy.extra: used by the first two samples (rank 0's) of even steps, by none at odd
    # steps (where its tangent is not zero: what no rank uses must still be left idle)
    x[::2, :2, 0] += 20.0
    return x, y


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    b = t.shape[1] // world
    return t[:, rank * b:(rank + 1) * b]


def snapshot(model, opt, losses) -> dict:
    sd = opt.state_dict()
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "state": {f"{k}.{n}": t.clone() for k, st in sd["state"].items() for n, t in st.items()},
        "hyper": {k: v.clone() for k, v in opt.hyper_state().items()},
        "losses": torch.stack(losses) if losses else torch.zeros(0),
    }


def build(case: dict, rank: int = 0):
    # "seed_by_rank": differently initialised replicas, which Marthe's first step aligns
    model = make_model(case.get("model", "mlp"), rank if case.get("seed_by_rank") else 0)
    net = DDP(model) if case.get("ddp") and dist.is_initialized() else model
    kwargs = {k: v for k, v in case.items()
              if k not in ("id", "model", "ddp", "val", "steps", "style", "seed_by_rank", "hvp_sub")}
    if kwargs.get("hvp") == "forward" or kwargs.get("hypergrad") == "jvp":
        kwargs["model"] = net  # the DDP wrapper itself where there is one
    opt = marthe_ext.Marthe(model.parameters(), **kwargs)
    return model, net, opt


def train(case: dict, model, net, opt, rank: int, world: int, first: int, steps: int, losses):
    x, y = batches(first + steps, seed=1)
    xv, yv = batches(first + steps, seed=2)
    x, y, xv, yv = (shard(t, rank, world) for t in (x, y, xv, yv))
    # "hvp_sub": N -- the HVP from a sub-batch (hvp_closure): the first half of each of N
    # ranks' shards, i.e. this process's part of that union of rows
    sub = case.get("hvp_sub")
    if sub:
        rows = torch.zeros(1, GLOBAL_BATCH, dtype=torch.bool)
        per = GLOBAL_BATCH // sub
        for r in range(sub):
            rows[0, r * per:r * per + per // 2] = True
        rows = shard(rows, rank, world)[0]
    for s in range(first, first + steps):
        def closure(s=s):
            return sq_loss(net(x[s]), y[s])

        def hvp_closure(s=s):
            return sq_loss(net(x[s][rows]), y[s][rows])

        def val_closure(s=s):
            # backward style under DDP: a DDP forward outside no_sync() would arm DDP's
            # reducer, and the next loss.backward() would then fail inside DDP's hooks
            with net.no_sync() if case.get("style") == "backward-no_sync" else contextlib.nullcontext():
                return sq_loss(net(xv[s]), yv[s])
        val = val_closure if case.get("val", True) else None
        style = case.get("style", "closure")
        if style == "closure":
            losses.append(opt.step(closure, val, hvp_closure=hvp_closure if sub else None))
            continue
        # backward style (training_loop.py): .grad with its graph, then opt.step()
        opt.zero_grad()
        with net.no_sync() if style == "backward-no_sync" else contextlib.nullcontext():
            loss = closure()
            loss.backward(create_graph=True)
        # loss=: the step averages it over the ranks (as a closure's), returns it and feeds
        # the default's loss trust region with it, so the run equals the closure style's
        losses.append(opt.step(val_closure=val, loss=loss))


def run_case(case: dict, rank: int, world: int) -> dict:
    model, net, opt = build(case, rank)
    losses: list = []
    train(case, model, net, opt, rank, world, 0, case.get("steps", 3), losses)
    return snapshot(model, opt, losses)


def checkpoint_case(case: dict, rank: int, world: int, outdir: str, load: str | None) -> dict:
    """2 steps, a checkpoint (written by rank 0 only), 2 more; then a fresh model and optimizer
    load the checkpoint and redo the last 2. With ``load``: only the resumed half, from it."""
    out = {}
    if load is None:
        model, net, opt = build(case)
        train(case, model, net, opt, rank, world, 0, 2, [])
        path = os.path.join(outdir, "ckpt.pt")
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        dist.barrier()
        losses: list = []
        train(case, model, net, opt, rank, world, 2, 2, losses)
        out["continued"] = snapshot(model, opt, losses)
        load = path
    model, net, opt = build(case)
    ckpt = torch.load(load)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    losses = []
    train(case, model, net, opt, rank, world, 2, 2, losses)
    out["resumed"] = snapshot(model, opt, losses)
    return out


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_reduce_coalesced", "broadcast_object_list", "barrier",
               "all_gather_object")


def count_collectives(case: dict, rank: int, world: int) -> list[int]:
    """Collectives launched by each opt.step (bare model: DDP's own broadcasts stay out)."""
    counts = {"n": 0}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(fn):
        def wrapper(*args, **kwargs):
            counts["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(fn))
    try:
        model, net, opt = build(case)
        x, y = batches(3, seed=1)
        x, y = shard(x, rank, world), shard(y, rank, world)
        per_step = []
        for s in range(3):
            before = counts["n"]
            opt.step(lambda: sq_loss(net(x[s]), y[s]),
                     (lambda: sq_loss(net(x[s]), y[s])) if case.get("val", True) else None)
            per_step.append(counts["n"] - before)
        return per_step
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def event_order(case: dict, rank: int, world: int) -> str:
    """The third step's autograd.grad calls ("g") and collectives ("c") in launch order."""
    events: list = []
    patched = {(dist, name): getattr(dist, name) for name in COLLECTIVES}
    patched[(torch.autograd, "grad")] = torch.autograd.grad

    def logging(fn, mark):
        def wrapper(*args, **kwargs):
            events.append(mark)
            return fn(*args, **kwargs)
        return wrapper

    model, net, opt = build(case)
    x, y = batches(3, seed=1)
    x, y = shard(x, rank, world), shard(y, rank, world)
    try:
        for s in range(3):
            if s == 2:
                for (owner, name), fn in patched.items():
                    setattr(owner, name, logging(fn, "g" if owner is torch.autograd else "c"))
            opt.step(lambda: sq_loss(net(x[s]), y[s]), lambda: sq_loss(net(x[s]), y[s]))
    finally:
        for (owner, name), fn in patched.items():
            setattr(owner, name, fn)
    return "".join(events)


def subgroup_case(case: dict, rank: int, world: int) -> dict:
    """Ranks 0 and 1 average over new_group([0, 1]) on halves of the batch; the others run
    alone (``process_group=False``) on the whole batch."""
    sub = dist.new_group([0, 1])  # every rank must call new_group
    if rank < 2:
        return run_case(dict(case, process_group=sub), rank, 2)
    return run_case(dict(case, process_group=False), 0, 1)


def experiments_sharding() -> dict:
    """python/run.py under torchrun: this rank's slice of a batch, an uneven batch refused,
    ranks that disagree caught, rank 0's BatchNorm statistics and LRS-OPT schedule shared."""
    from marthe_experiments import parallel

    out = {"rank": parallel.rank(), "world": parallel.world_size(), "slice": parallel.shard(torch.arange(6)),
           "wrapped": type(parallel.wrap(make_model("mlp"))).__name__}
    try:
        parallel.shard(torch.arange(5))
        out["uneven"] = "no error"
    except ValueError as exc:
        out["uneven"] = str(exc)
    parallel.check_agree("same", [1.5, float("nan")])  # equal on every rank: no error
    try:
        parallel.check_agree("probe", [float(parallel.rank())])
        out["disagree"] = "no error"
    except RuntimeError as exc:
        out["disagree"] = str(exc)
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(parallel.rank() + 1))
    parallel.sync_buffers(bn)
    out["bn"] = bn.running_mean.clone()
    out["etas"] = parallel.broadcast_from_main(torch.full((3,), float(parallel.rank())))
    return out


def fsdp_error() -> str:
    from torch.distributed.fsdp import fully_shard

    model = make_model("mlp")
    fully_shard(model)
    try:
        marthe_ext.Marthe(model.parameters())
    except Exception as exc:  # noqa: BLE001 - the test checks the type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=world, timeout=timedelta(seconds=INIT_TIMEOUT_S))


def main(rank: int, world: int, port: int, outdir: str, jobs: list, fail: str | None = None) -> None:
    """jobs: ("case", case) | ("checkpoint", case, load_path or None) | ("count", case) |
    ("subgroup", case) | ("fsdp", _) | ("bucket_mb", float): results saved to
    outdir/rank{rank}.pt under each job's index. Then, with ``fail``, ``failing(fail)``."""
    init(rank, world, port)
    results = {}
    try:
        for j, job in enumerate(jobs):
            kind = job[0]
            if kind == "case":
                results[j] = run_case(job[1], rank, world)
            elif kind == "checkpoint":
                results[j] = checkpoint_case(job[1], rank, world, outdir, job[2])
            elif kind == "count":
                results[j] = count_collectives(job[1], rank, world)
            elif kind == "order":
                results[j] = event_order(job[1], rank, world)
            elif kind == "bucket_mb":
                marthe_ext.distributed.BUCKET_CAP_MB = job[1]
            elif kind == "subgroup":
                results[j] = subgroup_case(job[1], rank, world)
            elif kind == "fsdp":
                results[j] = fsdp_error()
            elif kind == "experiments":
                results[j] = experiments_sharding()
            else:
                raise ValueError(kind)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        if fail is not None:
            failing(rank, outdir, fail)
    finally:
        dist.destroy_process_group()


def failing(rank: int, outdir: str, how: str) -> None:
    """Rank 1 raises ("raise") or stops calling collectives ("hang") in its second step; every
    other rank writes the error it got and how long it waited."""
    world = dist.get_world_size()
    group = dist.new_group(timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    model, net, opt = build({"dynamics": "sgd", "mu": 0.9, "process_group": group})
    x, y = batches(3, seed=1)
    x, y = shard(x, rank, world), shard(y, rank, world)
    start = time.monotonic()
    try:
        for s in range(3):
            if rank == 1 and s == 1:
                if how == "raise":
                    raise RuntimeError("rank 1 failed on purpose")
                time.sleep(GLOO_TIMEOUT_S + 3)
                os._exit(3)
            start = time.monotonic()
            opt.step(lambda: sq_loss(net(x[s]), y[s]))
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - the test checks what every rank saw
        if rank == 1:
            raise
        message = "".join(traceback.format_exception_only(type(exc), exc))
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - start:.3f}\n{message}")
