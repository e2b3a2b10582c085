"""CIFAR ResNets (He et al. 2016, §4.2): 3 stages of 16/32/64 channels, option-A shortcuts.

Depth 6n+2 with n basic blocks per stage; the option-A shortcut subsamples the input by 2 and
zero-pads the new channels (no parameters). Module names follow the classic implementation:
``conv1``, ``bn1``, ``layerS.B.{conv1,bn1,conv2,bn2,shortcut}``, ``linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


class LambdaLayer(nn.Module):
    """Wraps a tensor function as a module (used for the parameter-free option-A shortcut)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def pad_shortcut(x: torch.Tensor, pad_channels: int) -> torch.Tensor:
    """Option A: take every second pixel and add ``pad_channels`` zero channels on each side."""
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad_channels, pad_channels))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = LambdaLayer(partial(pad_shortcut, pad_channels=planes // 4))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: conv-BN-ReLU stem, three stages, global average pool, linear classifier."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(block, 16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-20 (0.27 M parameters)."""
    return _resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-32 (0.46 M parameters)."""
    return _resnet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-44 (0.66 M parameters)."""
    return _resnet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-56 (0.85 M parameters)."""
    return _resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-110 (1.7 M parameters)."""
    return _resnet(110, num_classes, in_channels)
