"""Torch-Pruning on the shipped Fashion-MNIST ResNet-20, shared by the Fashion-MNIST benchmarks.

Torch-Pruning is stepped (0.5% of per-layer ratio a step) until its own MACs count, then graphprune's
count of the exported model, meet the target, so both tools are compared at matched MACs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from graphprune.api import model_cost
from graphprune.demo import REFERENCE
from graphprune.torch_bridge.foldback import apply_to_module
from graphprune.torch_bridge.train import export_trained
from graphprune.zoo import build

MODEL = "resnet20"
# Torch-Pruning's schedule: per-layer ratio grows by TP_MAX_RATIO / TP_STEPS per step (0.5%).
TP_MAX_RATIO = 0.9
TP_STEPS = 180


def tp():  # noqa: ANN201 - the peer is imported only when it runs
    import torch_pruning

    return torch_pruning


def reference_module() -> nn.Module:
    """The zoo ResNet-20 carrying the shipped weights, in eval mode."""
    return apply_to_module(build(MODEL), REFERENCE).eval()


def classifier(module: nn.Module) -> nn.Module:
    """The last Linear layer: its 10 outputs are the logits, which neither tool may narrow."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


@dataclass
class PeerPruning:
    """The exported pruned model and how many Torch-Pruning steps it took."""

    model: onnx.ModelProto
    steps: int
    own_macs_kept: float

    @property
    def ratio(self) -> float:
        return round(TP_MAX_RATIO * self.steps / TP_STEPS, 4)


def prune_to_macs(
    module: nn.Module,
    importance: object,
    target: float,
    base_macs: int,
    sample_shape: tuple[int, ...],
    probe: Path,
    *,
    before_step: Callable[[], None] | None = None,
) -> PeerPruning:
    """Step Torch-Pruning on `module` (in place) until MACs <= target x base_macs; the export lands at `probe`.
    `before_step` runs before every step (e.g. fresh gradients for TaylorImportance)."""
    example = torch.zeros(1, *sample_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_ops, _ = tp().utils.count_ops_and_params(module, example)
        pruner = tp().pruner.MetaPruner(
            module,
            example,
            importance=importance,
            pruning_ratio=TP_MAX_RATIO,
            iterative_steps=TP_STEPS,
            ignored_layers=[classifier(module)],
        )
        for step in range(1, TP_STEPS + 1):
            if before_step is not None:
                before_step()
            pruner.step()
            ops, _ = tp().utils.count_ops_and_params(module, example)
            if ops > target * base_ops:
                continue
            model = export_trained(module, probe, sample_shape)
            if model_cost(model).macs <= target * base_macs:
                return PeerPruning(model, step, round(ops / base_ops, 4))
    raise RuntimeError(f"Torch-Pruning did not reach {target} of the MACs within ratio {TP_MAX_RATIO}.")
