"""What the training-time recipes share: where they start (a zoo model or an ONNX file), the measured
stages on the way (ONNX accuracy and cost), the folder for intermediate models, and publishing the final
model; under torchrun only rank 0 exports, prunes, evaluates and writes."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import onnx
import torch
from torch import nn

from graphprune.api import PruneResult, model_cost
from graphprune.data import ArrayDataset, load_splits
from graphprune.data.image_norm import OWN_STATISTICS
from graphprune.errors import GraphPruneError
from graphprune.model_io import input_image_norm, trained_metadata
from graphprune.onnxutil import atomic_write
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.runtime.shapes import image_shape
from graphprune.torch_bridge.train import (
    dist_info,
    export_trained,
    run_on_main,
)

log = logging.getLogger(__name__)


@dataclass
class Start:
    """Where a recipe starts: a zoo model (trained from scratch) or an ONNX model (fine-tuned)."""

    model: str | None = None
    onnx: str | None = None
    data: str = "fashion-mnist"
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 0
    image_norm: str | None = None  # how 8-bit images become inputs (graphprune.data.image_norm)

    def validate(self, module_given: bool = False) -> None:
        """A start needs a zoo name or an ONNX file, not both; a module passed in Python needs neither."""
        given = (self.model is not None) + (self.onnx is not None)
        if given > 1 or given == 0 and not module_given:
            raise GraphPruneError("give exactly one of a zoo model name (--model) or an ONNX file (--onnx).")

    @cached_property
    def onnx_proto(self) -> onnx.ModelProto:
        """The ONNX start, read once (its input shape, its module and its joins all come from it)."""
        from graphprune.model_io import load_model

        return load_model(self.onnx).proto

    def datasets(self) -> tuple[ArrayDataset, ArrayDataset]:
        """(train, validation) splits of the dataset, each optionally limited to a seeded subset; a
        folder's images fitted to the ONNX start's input size and normalised as `image_norm` says, else
        as the ONNX start records, else with the training split's own statistics."""
        if self.onnx is not None:
            shape, image_norm = (
                image_shape(self.onnx_proto),
                input_image_norm(self.onnx_proto, self.image_norm),
            )
        else:
            shape, image_norm = None, self.image_norm or OWN_STATISTICS  # a new model records its data's
        return load_splits(
            self.data,
            train_limit=self.train_limit,
            test_limit=self.val_limit,
            seed=self.seed,
            shape=shape,
            image_norm=image_norm,
        )

    def model_metadata(self, data: ArrayDataset) -> dict[str, str]:
        """What the recipe's models record: the ONNX start's metadata_props, and how `data` (the training
        data) was normalised."""
        return trained_metadata(self.onnx_proto if self.onnx is not None else None, data.image_norm)

    def module(self, train: ArrayDataset) -> nn.Module:
        """The starting module: a fresh zoo model sized for the data, or the ONNX model made trainable."""
        self.validate()
        if self.onnx is not None:
            from graphprune.torch_bridge.foldback import onnx_to_module

            return onnx_to_module(self.onnx_proto)
        from graphprune.zoo import build

        torch.manual_seed(self.seed)
        return build(self.model, in_channels=train.sample_shape[0], num_classes=train.num_classes)

    def is_residual(self, module: nn.Module, sample_shape: tuple[int, ...]) -> bool:
        """Residual (ResNet/DenseNet-like) or plain (VGG-like), which picks the papers' defaults: by the
        zoo name, else by whether the graph (the ONNX file, or the module exported) adds or concatenates."""
        if self.model is not None and ":" not in self.model:
            return "vgg" not in self.model.lower()
        return run_on_main(partial(self._graph_joins, module, sample_shape))

    def _graph_joins(self, module: nn.Module, sample_shape: tuple[int, ...]) -> bool:
        """Whether the ONNX file, or the module exported, has an Add, Sum or Concat."""
        if self.onnx is not None:
            proto = self.onnx_proto
        else:
            with workspace(None) as tmp:
                proto = export_trained(copy.deepcopy(module), tmp / "probe.onnx", sample_shape)
        return any(node.op_type in ("Add", "Sum", "Concat") for node in proto.graph.node)


@dataclass
class Stage:
    """One measured model on the way: ONNX accuracy (onnxruntime) and cost."""

    label: str
    path: Path
    accuracy: float
    macs: int
    params: int

    def row(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macs": self.macs, "params": self.params}


def measure(label: str, path: Path, val: ArrayDataset) -> Stage:
    """Accuracy (onnxruntime) and cost of the model written at `path`."""
    cost = model_cost(onnx.load(os.fspath(path)))
    accuracy = evaluate_onnx(path, val)
    log.info("%-20s accuracy %.4f  MACs %d  params %d", label, accuracy, cost.macs, cost.params)
    return Stage(label, path, accuracy, cost.macs, cost.params)


def export_stage(
    module: nn.Module, label: str, path: Path, val: ArrayDataset, metadata: Mapping[str, str]
) -> Stage:
    """Export the module with BN kept (on the CPU), `metadata` in its metadata_props, and measure it, on
    rank 0; every rank gets the Stage."""

    def on_main() -> Stage:
        export_trained(module, path, val.sample_shape, metadata)
        return measure(label, path, val)

    return run_on_main(on_main)


def prune_stage(
    module: nn.Module, pruning: Callable[[], PruneResult], label: str, path: Path, val: ArrayDataset
) -> Stage:
    """On rank 0: prune (`pruning`), save the graph, fold it back onto `module` (in place, checked equal
    to the graph) and measure it before any training. Every other rank folds the same graph back onto
    its own module, so all ranks go on from identical modules; every rank gets the Stage."""
    from graphprune.torch_bridge.foldback import apply_to_module, verify_foldback

    def on_main() -> tuple[Stage, onnx.ModelProto]:
        result = pruning()
        result.save(path, path.with_suffix(".plan.json"))
        verify_foldback(apply_to_module(module.cpu(), result.model), result.model)
        return measure(label, path, val), result.model

    stage, pruned = run_on_main(on_main)
    if not dist_info().is_main:
        apply_to_module(module.cpu(), pruned)
    return stage


@contextmanager
def workspace(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The folder for intermediate models: `workdir` (kept) or a temporary one (removed after)."""
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="graphprune-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(stage: Stage, output: str | os.PathLike[str]) -> Path:
    """Copy the final model to `output` atomically, on rank 0; the other ranks wait until it is written."""

    def on_main() -> Path:
        with atomic_write(output) as tmp:
            shutil.copyfile(stage.path, tmp)
        return Path(output)

    return run_on_main(on_main)


@dataclass
class RecipeResult:
    """What a recipe produced: the written model and every measured stage, first to last."""

    output: Path
    stages: list[Stage]

    @property
    def before(self) -> Stage:
        return self.stages[0]

    @property
    def after(self) -> Stage:
        return self.stages[-1]

    def rows(self) -> dict[str, dict[str, float]]:
        """Rows for graphprune.report.tables.comparison_table, one per stage."""
        return {stage.label: stage.row() for stage in self.stages}
