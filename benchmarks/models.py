"""The networks of the benchmarks, written to serve the experiments too (no torchvision).

* ``mlp``: the paper's MNIST network, 784-500-500-500-10 with ReLU (batch 100), or any widths.
* ``VGG``: VGG-11's layout for CIFAR-style inputs (3x3 conv + BatchNorm + ReLU, five
  max-pools, global average pooling, one linear classifier).
* ``ResNet``: the CIFAR-style ResNet-18 (3x3 stem, no stem pooling, four stages of two
  basic blocks of doubling width, global average pooling).

``width`` is the number of channels of the first block (64 in the published networks);
CPU benchmark runs use 16, a quarter, so that one MARTHE step of a convolutional network
takes a fraction of a second on two cores. Both CNNs take any number of input channels
and any image of at least 1x1 pixels (pools stop at 1x1), so the same code runs on 8x8
digits, 28x28 Fashion-MNIST and 32x32 CIFAR-10 (``build_model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def mlp(in_features: int = 784, hidden: Sequence[int] = (500, 500, 500),
        num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = (in_features, *hidden)
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-11 with ``width`` channels in the first block (every block scaled alike)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in _VGG11:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, item * width // 64)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout: stages of ``blocks`` basic blocks, widths w, 2w, 4w, 8w."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, 2 if (j == 0 and i > 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def vgg11(num_classes: int = 10, width: int = 64) -> nn.Module:
    return VGG(3, num_classes, width=width, image_size=32)


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    return ResNet(3, num_classes, width=width)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                hidden: Sequence[int] = (500, 500, 500), width: int = 64,
                blocks: Sequence[int] = (2, 2, 2, 2)) -> nn.Module:
    """"mlp" | "vgg" | "resnet" for inputs of shape (C, H, W)."""
    c, h, w = input_shape
    if name == "mlp":
        return mlp(c * h * w, hidden, num_classes)
    if name == "vgg":
        return VGG(c, num_classes, width=width, image_size=min(h, w))
    if name == "resnet":
        return ResNet(c, num_classes, width=width, blocks=blocks)
    raise ValueError(f"unknown model {name!r}; choose mlp, vgg or resnet")


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
