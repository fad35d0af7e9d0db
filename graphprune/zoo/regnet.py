"""RegNetX (Radosavovic et al. 2020) for small images: X blocks (1x1 conv, 3x3 grouped conv, 1x1 conv,
bottleneck ratio 1, residual) with 16-channel conv groups, whose conv groups graphprune can remove whole.

Widths and group width are RegNetX-400MF's (32, 64, 160, 400; 16), depths RegNetX-200MF's (1, 1, 4, 7),
so that it trains on two CPU cores in about half an hour. The stem (32 channels) and the first stage
keep stride 1, so a 28x28 input reaches 4x4 before the global pool.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.zoo._init import init_weights

# (width, depth, first stride) per stage.
STAGES = ((32, 1, 1), (64, 1, 2), (160, 4, 2), (400, 7, 2))
GROUP_WIDTH = 16
STEM_CHANNELS = 32


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) -> BN, then ReLU unless `relu` is False."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class XBlock(nn.Module):
    """1x1 -> 3x3 grouped (the stride) -> 1x1, added to the input (projected by a strided 1x1 conv
    when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            conv_bn(in_ch, out_ch, 1),
            conv_bn(out_ch, out_ch, 3, stride, groups=out_ch // GROUP_WIDTH),
            conv_bn(out_ch, out_ch, 1, relu=False),
        )
        changes = stride != 1 or in_ch != out_ch
        self.proj = conv_bn(in_ch, out_ch, 1, stride, relu=False) if changes else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.f(x))


class RegNetX(nn.Module):
    """RegNetX with `features` (stem, 13 X blocks) and a linear classifier."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, STEM_CHANNELS, 3)]
        channels = STEM_CHANNELS
        for width, depth, stride in STAGES:
            for index in range(depth):
                layers.append(XBlock(channels, width, stride if index == 0 else 1))
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
