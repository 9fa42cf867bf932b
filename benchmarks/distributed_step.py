"""Data-parallel ``Marthe.step``: step time and collectives per step, 1 and 2 ranks.

    python benchmarks/distributed_step.py [--steps 30] [--hidden 512] [--batch 64]

Every configuration trains the same MLP on the same global batch (each of N ranks takes
batch/N rows), ``Marthe(dynamics="sgdm", mu=0.99)`` in validation mode with the reverse
HVP engine. Rows: one process; 2 ranks with syncing off (``process_group=False``: the
compute alone, each rank on half the batch); 2 ranks synced (the default). Gloo on the CPU
(one thread per rank, on 127.0.0.1); NCCL when at least two GPUs are visible (one per rank).
The time is the median step over ``--steps`` steps after 3 warm-up steps, on rank 0; the
collectives and bytes are per step (``opt``'s sync counts its buckets).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import marthe_ext  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, sync: bool, backend: str, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden),
                          nn.Tanh(), nn.Linear(args.hidden, 10)).to(device)
    opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics="sgdm", mu=0.99,
                            process_group=None if sync else False)
    g = torch.Generator().manual_seed(1)
    n = args.batch // world
    x = torch.randn(args.batch, 784, generator=g)[rank * n:(rank + 1) * n].to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g)[rank * n:(rank + 1) * n].to(device)
    xv = torch.randn(args.batch, 784, generator=g)[rank * n:(rank + 1) * n].to(device)
    yv = torch.randint(0, 10, (args.batch,), generator=g)[rank * n:(rank + 1) * n].to(device)

    def step():
        opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                 lambda: nn.functional.cross_entropy(model(xv), yv))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    counter = opt._protocol.sync
    before = counter.collectives
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        per_step = (counter.collectives - before) / args.steps
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        # gradient + HVP + loss/mask bucket, and the validation gradient
        sent = 0 if per_step == 0 else 3 * params
        torch.save({"ms": 1e3 * statistics.median(times), "collectives": per_step, "mb": sent / 2**20},
                   out)
    if world > 1:
        dist.destroy_process_group()


def run(world: int, sync: bool, backend: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        if world == 1:
            _worker(0, 1, 0, args, sync, backend, out)
        else:
            mp.start_processes(_worker, args=(world, _free_port(), args, sync, backend, out),
                               nprocs=world, start_method="spawn")
        return torch.load(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    backends = ["gloo"] + (["nccl"] if torch.cuda.device_count() >= 2 else [])
    params = 784 * args.hidden + args.hidden * args.hidden + 10 * args.hidden + 2 * args.hidden + 10
    print(f"MLP 784-{args.hidden}-{args.hidden}-10 ({params:,} parameters), global batch {args.batch}, "
          f"Marthe sgdm mu=0.99, val mode, reverse HVP; torch {torch.__version__}")
    print("| backend | ranks | sync | step (ms) | collectives / step | MiB reduced / step |")
    print("|---|---|---|---|---|---|")
    for backend in backends:
        for world, sync in ((1, False), (2, False), (2, True)):
            r = run(world, sync, backend, args)
            print(f"| {backend if world > 1 else ('cpu' if backend == 'gloo' else 'cuda')} | {world} | "
                  f"{'on' if sync and world > 1 else 'off'} | {r['ms']:.2f} | {r['collectives']:g} | "
                  f"{r['mb']:.2f} |")
    if torch.cuda.device_count() < 2:
        print("(NCCL rows need two visible GPUs, one per rank)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
