"""The baseline both tools start from, and Torch-Pruning at matched MACs, shared by the Fashion-MNIST benchmarks.

The default baseline is the shipped ResNet-20; `--model vgg11_bn --baseline FILE.onnx` (trained with
tools/train_reference.py) runs the same benchmark on another zoo model. Torch-Pruning is stepped (0.5% of per-layer ratio a step) until its own MACs count, then graphprune's
count of the exported model, meet the target, so both tools are compared at matched MACs.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from graphprune.api import model_cost
from graphprune.cli.demo import REFERENCE
from graphprune.torch_bridge.foldback import apply_to_module
from graphprune.torch_bridge.train import export_trained
from graphprune.zoo import build

DEFAULT_MODEL = "resnet20"
# Torch-Pruning's schedule: per-layer ratio grows by TP_MAX_RATIO / TP_STEPS per step (0.5%).
TP_MAX_RATIO = 0.9
TP_STEPS = 180


def tp():  # noqa: ANN201 - the peer is imported only when it runs
    import torch_pruning

    return torch_pruning


@dataclass(frozen=True)
class Reference:
    """The trained baseline: a zoo model name and the ONNX file holding its weights."""

    model: str = DEFAULT_MODEL
    onnx: Path = REFERENCE

    @property
    def shipped(self) -> bool:
        return self.model == DEFAULT_MODEL and self.onnx == REFERENCE

    @property
    def suffix(self) -> str:
        """Results-file suffix: none for the shipped model (the historical names), else `_MODEL`."""
        return "" if self.shipped else f"_{self.model}"

    @property
    def title(self) -> str:
        return "ResNet-20" if self.shipped else self.model

    def module(self, weights: onnx.ModelProto | None = None) -> nn.Module:
        """The zoo module carrying the baseline's weights (or a pruned model's `weights`), in eval mode."""
        return apply_to_module(build(self.model), self.onnx if weights is None else weights).eval()

    def describe(self) -> dict[str, object]:
        """Model, file and (when tools/train_reference.py wrote one beside it) the training record."""
        record = self.onnx.with_suffix(".json")
        training = json.loads(record.read_text()) if record.is_file() else None
        return {"model": self.model, "onnx": self.onnx.name, "training": training}


def reference_text(payload: dict[str, object]) -> tuple[str, str]:
    """(title, one-sentence description) of the baseline a results payload was measured on."""
    ref: dict[str, object] = payload.get("reference") or Reference().describe()  # type: ignore[assignment]
    if ref["model"] == DEFAULT_MODEL and ref["onnx"] == REFERENCE.name:
        return "ResNet-20", (
            "the shipped `graphprune/zoo/weights/resnet20_fmnist.onnx` (CIFAR-style ResNet-20, 1x28x28 input, "
            "BatchNorm kept, 4 epochs one-cycle on the full training set)"
        )
    training: dict[str, object] | None = ref.get("training")  # type: ignore[assignment]
    how = (
        f"{training['epochs']} epochs ({training['recipe']}, seed {training['seed']}) on "
        f"{training['train_samples']:,} training images, on {training.get('device', 'cpu')}"
        if training
        else "training record not found"
    )
    return str(ref["model"]), (
        f"zoo `{ref['model']}` (1x28x28 input, BatchNorm kept) trained by `tools/train_reference.py --model "
        f"{ref['model']}`: {how}"
    )


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    """--model / --baseline (the starting point) and --device (where fine-tunes run)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo model the baseline weights fit")
    parser.add_argument("--baseline", type=Path, help="baseline ONNX (default: the shipped ResNet-20)")
    parser.add_argument("--device", default="cpu", help="fine-tune device: cpu, cuda or auto")


def reference_from(args: argparse.Namespace) -> Reference:
    if args.baseline is None and args.model != DEFAULT_MODEL:
        raise SystemExit(f"--model {args.model} needs --baseline FILE.onnx (tools/train_reference.py).")
    return Reference(args.model, args.baseline or REFERENCE)


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
    round_to: int | None = None,
) -> PeerPruning:
    """Step Torch-Pruning on `module` (in place) until MACs <= target x base_macs; the export lands at `probe`.
    `before_step` runs before every step (e.g. fresh gradients for TaylorImportance); `round_to` is
    Torch-Pruning's own (kept widths in multiples of it; None: its default, any width)."""
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
            round_to=round_to,
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
