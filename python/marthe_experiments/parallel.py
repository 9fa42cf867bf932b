"""Data parallelism for the experiments under ``torchrun`` (one process per device).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``setup``
then joins the process group (gloo on the CPU, NCCL on GPUs); every rank builds the same
model from the same seed, sees the same batch schedule and trains on its own equal slice
of each training batch (``shard``). The validation batches are not split: each rank
evaluates the same one (their average is that loss again), so any batch size works there.
Models are wrapped in DistributedDataParallel (``wrap``): the torch optimizers'
``loss.backward()`` then averages gradients through DDP's hooks, while
``marthe_ext.Marthe`` averages over the default group by itself (its closure step
differentiates with ``torch.autograd.grad``, which DDP's hooks never see). Only rank 0
prints and writes results.
"""
from __future__ import annotations

import os

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
