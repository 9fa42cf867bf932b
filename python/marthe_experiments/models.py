"""The networks of the experiments and of the benchmarks (``benchmarks/models.py`` imports
them from here, so both measure the same code; no torchvision).

* ``mlp``: the paper's E1 / MNIST network (784-500-500-500-10 ReLU) or any widths.
* ``VGG``: a CIFAR-style VGG (3x3 conv + BatchNorm + ReLU blocks, max-pooling, a linear
  classifier on globally pooled features), VGG-11's layout scaled by ``width / 64``.
* ``ResNet``: a CIFAR-style ResNet (3x3 stem, no stem pooling, BasicBlocks in stages of
  doubling width, global average pooling), ResNet-18's layout with ``width`` channels in
  the first stage and ``blocks`` blocks per stage.
* ``vgg11`` / ``resnet18``: the published 32x32 RGB networks (``width`` 64), which the
  benchmarks time; their parameter counts are checked in tests/test_benchmarks_smoke.py.

The experiments build their networks with ``build_model``, whose default ``width`` of 16
(a quarter of the published one) keeps CPU runs short; the classes keep that default too,
since recorded experiment results depend on it. Both CNNs accept any number of input
channels and any image of at least 1x1 pixels (pools stop at 1x1), so the same code runs
on 8x8 digits, 28x28 Fashion-MNIST and 32x32 CIFAR-10.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MODELS = ("mlp", "cnn", "vgg", "resnet")

# Channels of the first block in the published VGG-11 and ResNet-18.
PUBLISHED_WIDTH = 64

# VGG-11's sequence of conv widths ("M" = 2x2 max-pool), scaled by ``width / 64``.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def mlp(in_features: int = 784, hidden: Sequence[int] = (500, 500, 500),
        num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """Three 3x3 conv-BatchNorm-ReLU blocks (width, 2 width, 2 width channels), 2x2 max-pools
    after the first two, global average pooling and a linear classifier: an E2-style BN CNN
    that trains Fashion-MNIST in about a minute per run on one CPU core (issue 15's study)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i, out in enumerate((width, 2 * width, 2 * width)):
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        if i < 2:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-11's conv layout with ``width`` channels in the first block (64 in the original).

    Pooling stops when the feature map reaches 1x1, so small inputs skip the last pools.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout (4 stages of ``blocks`` BasicBlocks, widths w, 2w, 4w, 8w)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def vgg11(num_classes: int = 10, width: int = PUBLISHED_WIDTH) -> nn.Module:
    """VGG-11 for 32x32 RGB images (9,228,362 parameters at the published width)."""
    return VGG(3, num_classes, width=width, image_size=32)


def resnet18(num_classes: int = 10, width: int = PUBLISHED_WIDTH) -> nn.Module:
    """The CIFAR-style ResNet-18 (11,173,962 parameters at the published width)."""
    return ResNet(3, num_classes, width=width)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *,
                hidden: Sequence[int] = (500, 500, 500), width: int = 16,
                blocks: Sequence[int] = (2, 2, 2, 2)) -> nn.Module:
    """A model for inputs of shape (C, H, W)."""
    c, h, w = input_shape
    if name == "mlp":
        return mlp(c * h * w, hidden, num_classes)
    if name == "cnn":
        return small_cnn(c, num_classes, width=width)
    if name == "vgg":
        return VGG(c, num_classes, width=width, image_size=min(h, w))
    if name == "resnet":
        return ResNet(c, num_classes, width=width, blocks=blocks)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
