"""CIFAR-style ResNet-20/56/110 (He et al. 2016) with option-B projection shortcuts.

The shortcut is a 1x1 conv + BN whenever the shape changes, so every residual group is a plain
Conv/BN/Add pattern the ONNX analysis can follow (option A's zero padding is not exportable cleanly).
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.errors import InvalidModelError
from graphprune.zoo._init import init_weights

WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a residual connection (projected when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem, three stages of `blocks` BasicBlocks, global pool, linear."""

    def __init__(self, blocks: int, *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        stages = []
        for index, planes in enumerate(WIDTHS):
            first = BasicBlock(WIDTHS[max(index - 1, 0)], planes, 1 if index == 0 else 2)
            stages.append(nn.Sequential(first, *(BasicBlock(planes, planes, 1) for _ in range(blocks - 1))))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depth: int, *, in_channels: int = 1, num_classes: int = 10) -> CifarResNet:
    """ResNet-`depth` with depth = 6n + 2 (20, 56, 110 ...)."""
    if (depth - 2) % 6 != 0:
        raise InvalidModelError(
            f"CIFAR ResNet depth must be 6n+2 (20, 56, 110), got {depth}; pick one of those."
        )
    return CifarResNet((depth - 2) // 6, in_channels=in_channels, num_classes=num_classes)
