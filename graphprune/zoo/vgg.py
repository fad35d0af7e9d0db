"""VGG-11/16/19 with batch norm for small images (the Network Slimming setting).

Five 2x2 max-pools with ceil_mode reduce both 28x28 (28-14-7-4-2-1) and 32x32 (32-16-8-4-2-1) inputs
to 1x1, so the classifier is a plain Flatten -> Linear -> ReLU -> Linear on 512 features.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.zoo._init import init_weights

# Channel counts per conv; "M" is a max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


class VGG(nn.Module):
    """`features` (conv-BN-ReLU stacks and pools) followed by a two-layer `classifier`."""

    def __init__(self, config: tuple[int | str, ...], *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                width = int(item)
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_bn(depth: int, *, in_channels: int = 1, num_classes: int = 10) -> VGG:
    """VGG-`depth` (11, 16 or 19) with batch norm after every conv."""
    return VGG(CONFIGS[depth], in_channels=in_channels, num_classes=num_classes)
