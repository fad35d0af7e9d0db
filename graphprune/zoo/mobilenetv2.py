"""MobileNetV2 (Sandler et al. 2018) for small images: stride-1 stem, inverted residuals, depthwise convs.

As in the common CIFAR variant, the stem and the second stage keep stride 1, so a 28x28 input reaches
4x4 before the global pool. `width` scales every layer (rounded to a multiple of 8, as torchvision).
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.zoo._init import init_weights

# (expansion t, output channels c, repeats n, first stride s) per stage.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never dropping more than 10% (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU6, the building unit of MobileNetV2."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when stride 1 and shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with `features` (stem, 17 inverted residuals, 1x1 head conv) and a linear classifier."""

    def __init__(self, *, width: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * width)
        last = make_divisible(LAST_CHANNELS * max(1.0, width))
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, channels, 3)]
        for expansion, out, repeats, stride in STAGES:
            out_ch = make_divisible(out * width)
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_ch, stride if index == 0 else 1, expansion))
                channels = out_ch
        layers.append(conv_bn_relu6(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
