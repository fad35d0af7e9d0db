"""DenseNet-BC (Huang et al. 2017) for small images: bottleneck layers, concatenation, compression.

DenseNet-BC-40 has three dense blocks of six bottleneck layers (growth 12) and transitions that halve
the channels; every layer's input is the concat of all earlier outputs, which exercises Concat offsets.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.errors import InvalidModelError
from graphprune.zoo._init import init_weights


class Bottleneck(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output concatenated onto the input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        inner = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compression) followed by 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(torch.relu(self.bn(x))))


class DenseNetBC(nn.Module):
    """Stem conv (2k channels), three dense blocks with two transitions, BN-ReLU, global pool, linear."""

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        compression: float = 0.5,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise InvalidModelError(
                f"DenseNet-BC depth must be 6n+4 (40, 100 ...), got {depth}; pick one of those."
            )
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for index in range(3):
            for _ in range(layers_per_block):
                blocks.append(Bottleneck(channels, growth))
                channels += growth
            if index < 2:
                out_ch = int(channels * compression)
                blocks.append(Transition(channels, out_ch))
                channels = out_ch
        self.features = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
