"""The benchmark configurations of the paper's networks.

The networks themselves (``mlp``, ``VGG``, ``ResNet``, ``BasicBlock``, ``vgg11``,
``resnet18``, ``build_model``) are defined once, in python/marthe_experiments/models.py,
and re-exported here, so the benchmarks time exactly the code the experiments train:

* ``mlp()``: the paper's MNIST network, 784-500-500-500-10 with ReLU (batch 100).
* ``vgg11()``: VGG-11's layout for CIFAR-style inputs (3x3 conv + BatchNorm + ReLU, five
  max-pools, global average pooling, one linear classifier).
* ``resnet18()``: the CIFAR-style ResNet-18 (3x3 stem, no stem pooling, four stages of two
  basic blocks of doubling width, global average pooling).

``width`` is the number of channels of the first block (64 in the published networks, the
default of ``vgg11`` / ``resnet18``); CPU benchmark runs use 16, a quarter, so that one
MARTHE step of a convolutional network takes a fraction of a second on two cores. Note
that ``build_model`` (the experiments' builder) defaults to width 16, not 64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from marthe_experiments.models import BasicBlock, ResNet, VGG, build_model, mlp, resnet18, vgg11

__all__ = ["BasicBlock", "ResNet", "VGG", "build_model", "mlp", "resnet18", "vgg11", "ModelSpec",
           "MODELS", "model_spec", "random_batch", "num_params"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a benchmark model and random batches for it."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example
    batch: int
    num_classes: int = 10


MODELS = ("mlp", "vgg11", "resnet18")


def model_spec(name: str, reduced: bool = False) -> ModelSpec:
    """The benchmark configuration of ``name``; ``reduced`` is the CPU-sized variant.

    The MLP keeps its full size and batch on the CPU (it is cheap); the convolutional
    networks get a quarter of the channels and batch 8.
    """
    if name == "mlp":
        return ModelSpec("mlp", mlp, (1, 28, 28), 100)
    width, batch = (16, 8) if reduced else (64, 128)
    if name == "vgg11":
        return ModelSpec("vgg11", lambda: vgg11(width=width), (3, 32, 32), batch)
    if name == "resnet18":
        return ModelSpec("resnet18", lambda: resnet18(width=width), (3, 32, 32), batch)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def random_batch(spec: ModelSpec, device, dtype=torch.float32, generator=None,
                 batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels: the benchmarks time the step, not the data."""
    n = spec.batch if batch is None else batch
    x = torch.randn((n, *spec.input_shape), generator=generator, dtype=dtype)
    y = torch.randint(0, spec.num_classes, (n,), generator=generator)
    return x.to(device), y.to(device)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
