"""Data parallelism for the experiments under ``torchrun`` (one process per device).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``setup``
then joins the process group (gloo on the CPU, NCCL on GPUs); every rank builds the same
model from the same seed, sees the same batch schedule and trains on its own equal slice
of each training batch (``shard``). The validation batches are not split: each rank
evaluates the same one (their average is that loss again), so any batch size works there.
Models are wrapped in DistributedDataParallel (``wrap``): the torch optimizers'
``loss.backward()`` then averages gradients through DDP's hooks, while
``marthe_ext.Marthe`` averages over the default group by itself (its closure step
differentiates with ``torch.autograd.grad``, which DDP's hooks never see), so every
method -- torch.optim baselines, schedule-free, Prodigy, MARTHE -- trains the same model on
every rank. BatchNorm's running statistics are per rank in training (as with DDP):
``sync_buffers`` puts rank 0's on every rank before an evaluation, and ``check_agree``
fails a run whose ranks ended apart. Only rank 0 prints and writes results.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return device


def wait_for_all() -> None:
    """A barrier at the end of a run: no rank tears its process group down while rank 0 is
    still writing results (measured: a rank that did so now and then aborted in gloo,
    "terminate called without an active exception")."""
    if world_size() > 1:
        dist.barrier()


def teardown() -> None:
    if world_size() > 1:
        dist.destroy_process_group()


def shard(rows: Tensor) -> Tensor:
    """This rank's slice of a batch (its first dimension), all slices of equal size: the mean
    of the ranks' mean losses is then the mean loss of the whole batch."""
    n, size = world_size(), len(rows)
    if n == 1:
        return rows
    if size % n:
        raise ValueError(f"a batch of {size} examples does not split evenly over {n} ranks: "
                         f"choose a batch size divisible by the number of processes")
    per = size // n
    return rows[rank() * per:(rank() + 1) * per]


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several ranks, else ``model``."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_from_main(t: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank (``t`` itself in one process)."""
    if world_size() > 1:
        t = t.contiguous().clone()
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Rank 0's module buffers (BatchNorm running statistics) on every rank, one broadcast
    per dtype: each rank's running statistics saw only its own shards, so evaluating
    with them would give each rank its own numbers."""
    if world_size() == 1:
        return
    by_dtype: dict = {}
    for b in model.buffers():
        by_dtype.setdefault((b.dtype, b.device), []).append(b)
    for bufs in by_dtype.values():
        flat = broadcast_from_main(torch.cat([b.reshape(-1) for b in bufs]))
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def check_agree(what: str, values: Sequence[float]) -> None:
    """Fail loudly when the ranks' ``values`` (a run's final losses, accuracies, LR) are not
    bit-identical: every rank must have trained the same model on the global batch."""
    if world_size() == 1:
        return
    mine = [repr(float(v)) for v in values]  # repr: NaN equals NaN, -0.0 differs from 0.0
    every = [None] * world_size()
    dist.all_gather_object(every, mine)
    if any(other != mine for other in every):
        raise RuntimeError(f"{what}: the ranks ended with different results {every}; every rank "
                           f"must train the same model (are its gradients averaged over the ranks?)")
