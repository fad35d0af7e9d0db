"""Weight initialisation shared by the zoo models (Kaiming for convs, unit BN, small linear)."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, BN gamma=1 beta=0, linear N(0, 0.01) with zero bias (the papers' recipe)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
