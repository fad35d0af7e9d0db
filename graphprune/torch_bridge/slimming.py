"""Network Slimming (Liu et al., ICCV 2017): sparsity training on BN gamma, one global |gamma|
threshold, fold back, fine-tune; optionally several passes.

Sparsity training adds lambda * sum |gamma| over every BatchNorm layer to the loss. It is applied as
the paper's sub-gradient: after backward, `sign(gamma) * lambda` is added to each gamma's gradient
(`BNSparsity`, a `train.fit` callback). lambda defaults to 1e-4 for plain (VGG-like) networks and
1e-5 for residual ones (ResNet, DenseNet), as in the paper.

Pruning is `graphprune.api.prune(model, slimming_options(p), criterion="bn", aggregate="max")`, and
that reproduces the paper's global percentile threshold:

- the `bn` criterion scores a channel by |gamma|; `normalize="none"` keeps raw |gamma| so one number
  ranks channels of every layer; `global_ranking=True` sorts all channels together and removes the
  `int(p * total)` smallest, i.e. every channel under the p-th percentile of all |gamma|. On a plain
  conv-BN chain (VGG) the kept widths equal the reference code's `|gamma| >= sorted[int(p * total)]`
  exactly (tests/test_slimming.py checks it; the reference's `> threshold` also drops the one channel
  at the threshold itself, and ties at the threshold are broken by order here);
- "never an empty layer": `min_channels` (default 1) is kept in every layer; `max_ratio` is just
  below 1 so it does not cap anything else. When a layer hits its minimum, the channels it keeps are
  taken from the next-smallest |gamma| elsewhere, so exactly `int(p * total)` channels still go (the
  reference code instead crashes or removes fewer);
- channels tied by a residual sum form one group and are removed together everywhere (METHODS.md,
  "treat the residual stream as one group"); `aggregate="max"` removes a tied channel only when its
  |gamma| is under the threshold in every BN that writes it, and the channel counts once in
  `total`. On plain chains this changes nothing.

The multi-pass variant repeats prune + fine-tune; each pass removes `ratio` of the channels left, and
every fine-tune but the last keeps the sparsity penalty so the next pass again finds small gammas.

This module also holds what both training-time recipes share (starting module, datasets, measured
stages, the before/after rows).

Under torchrun (``torchrun --nproc_per_node=N -m graphprune.cli slim ...``) every rank trains (DDP, see
`train.fit`), but only rank 0 exports, prunes, evaluates in onnxruntime and writes files (intermediate
models, the output); the others wait for it. After each prune, every rank folds rank 0's pruned graph
back onto its own module, so all ranks go on from identical modules (widths and weights). Every rank
returns the same result.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import onnx
import torch
from torch import nn

from graphprune.api import PruneResult, model_cost, prune
from graphprune.data import ArrayDataset, load_dataset
from graphprune.errors import GraphPruneError, PlanError
from graphprune.planning import PlanOptions
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.torch_bridge.distill import Teacher
from graphprune.torch_bridge.train import (
    Callback,
    TrainConfig,
    TrainState,
    dist_info,
    export_trained,
    fit,
    init_distributed,
    run_on_main,
)
from graphprune.util import atomic_write

log = logging.getLogger(__name__)

LAMBDA_PLAIN = 1e-4
LAMBDA_RESIDUAL = 1e-5
# Just under 1: PlanOptions needs max_ratio < 1, and only min_channels should limit a layer.
NO_CAP = 1.0 - 1e-9


# Shared by the training-time recipes --------------------------------------------------------------


@dataclass
class Start:
    """Where a recipe starts: a zoo model (trained from scratch) or an ONNX model (fine-tuned)."""

    model: str | None = None
    onnx: str | None = None
    data: str = "fashion-mnist"
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 0

    def validate(self, module_given: bool = False) -> None:
        """A start needs a zoo name or an ONNX file, not both; a module passed in Python needs neither."""
        given = (self.model is not None) + (self.onnx is not None)
        if given > 1 or given == 0 and not module_given:
            raise GraphPruneError("give exactly one of a zoo model name (--model) or an ONNX file (--onnx).")

    def datasets(self) -> tuple[ArrayDataset, ArrayDataset]:
        """(train, validation) splits of the dataset, each optionally limited to a seeded subset."""
        train = load_dataset(self.data, "train", limit=self.train_limit, seed=self.seed)
        val = load_dataset(self.data, "test", limit=self.val_limit, seed=self.seed)
        return train, val

    def module(self, train: ArrayDataset) -> nn.Module:
        """The starting module: a fresh zoo model sized for the data, or the ONNX model made trainable."""
        self.validate()
        if self.onnx is not None:
            from graphprune.model_io import load_model
            from graphprune.torch_bridge.foldback import onnx_to_module

            return onnx_to_module(load_model(self.onnx).proto)
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
            from graphprune.model_io import load_model

            proto = load_model(self.onnx).proto
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


def export_stage(module: nn.Module, label: str, path: Path, val: ArrayDataset) -> Stage:
    """Export the module with BN kept (on the CPU) and measure it, on rank 0; every rank gets the Stage."""

    def on_main() -> Stage:
        export_trained(module, path, val.sample_shape)
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


# Network Slimming ---------------------------------------------------------------------------------


def bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every affine BatchNorm layer of the module (the ones with a gamma)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def bn_l1(module: nn.Module) -> torch.Tensor:
    """sum |gamma| over all BN layers: the sparsity term (as a differentiable regularizer)."""
    layers = bn_layers(module)
    if not layers:
        raise PlanError(f"{type(module).__name__} has no affine BatchNorm layer; Network Slimming needs BN.")
    return torch.stack([layer.weight.abs().sum() for layer in layers]).sum()


class BNSparsity(Callback):
    """Adds the sub-gradient lambda * sign(gamma) of lambda * sum |gamma| to every BN gamma's gradient."""

    def __init__(self, lam: float) -> None:
        if lam < 0:
            raise GraphPruneError(f"the sparsity lambda must be non-negative, got {lam}.")
        self.lam = lam

    def on_train_begin(self, state: TrainState) -> None:
        if not bn_layers(state.module):
            raise PlanError(
                f"{type(state.module).__name__} has no affine BatchNorm layer; Network Slimming needs BN."
            )

    def after_backward(self, state: TrainState) -> None:
        if not self.lam:
            return
        with torch.no_grad():
            for layer in bn_layers(state.module):
                if layer.weight.grad is not None:
                    layer.weight.grad.add_(torch.sign(layer.weight), alpha=self.lam)


def slimming_options(ratio: float, *, min_channels: int = 1, max_ratio: float = NO_CAP) -> PlanOptions:
    """Plan options that make `prune(..., criterion="bn")` the paper's global |gamma| percentile."""
    return PlanOptions(
        ratio=ratio,
        global_ranking=True,
        normalize="none",
        min_channels=min_channels,
        max_ratio=max_ratio,
    )


def slim_prune(
    model: onnx.ModelProto | str | os.PathLike[str],
    ratio: float,
    *,
    min_channels: int = 1,
    max_ratio: float = NO_CAP,
) -> PruneResult:
    """Remove the fraction `ratio` of all BN channels with the smallest |gamma|, exactly and verified."""
    options = slimming_options(ratio, min_channels=min_channels, max_ratio=max_ratio)
    return prune(model, options, criterion="bn", aggregate="max")


@dataclass
class SlimmingConfig:
    """One Network Slimming run (see the module docstring)."""

    start: Start = field(default_factory=Start)
    output: Path = Path("slim.onnx")
    lam: float | None = None
    ratio: float = 0.5
    passes: int = 1
    epochs_sparse: int = 10
    epochs_finetune: int = 5
    min_channels: int = 1
    max_ratio: float = NO_CAP
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_lr: float = 0.01
    workdir: Path | None = None

    def validate(self, module_given: bool = False) -> None:
        self.start.validate(module_given)
        slimming_options(self.ratio, min_channels=self.min_channels, max_ratio=self.max_ratio).validate()
        if self.passes < 1 or self.epochs_sparse < 0 or self.epochs_finetune < 0:
            raise GraphPruneError(
                "--passes must be at least 1 and the epoch counts non-negative; fix the slimming settings."
            )

    def lambda_for(self, module: nn.Module, sample_shape: tuple[int, ...]) -> float:
        if self.lam is not None:
            return self.lam
        return LAMBDA_RESIDUAL if self.start.is_residual(module, sample_shape) else LAMBDA_PLAIN


@dataclass
class SlimmingResult(RecipeResult):
    """Stages: [input (ONNX start only)], sparsity-trained, then per pass pruned and fine-tuned."""

    lam: float = 0.0


def run_slimming(
    config: SlimmingConfig, *, module: nn.Module | None = None, teacher: Teacher | None = None
) -> SlimmingResult:
    """Sparsity-train, prune by the global |gamma| threshold, fold back and fine-tune (`passes` times);
    write the final model to `config.output`. `module` replaces the start model (e.g. the user's own);
    `teacher` (e.g. the original model) distils into every fine-tune (see `fit`).
    Under torchrun, rank 0 alone exports, prunes, measures and writes (see the module docstring)."""
    config.validate(module is not None)
    init_distributed(config.train.device)
    train, val = config.start.datasets()
    module = module if module is not None else config.start.module(train)
    lam = config.lambda_for(module, train.sample_shape)
    sparse = replace(config.train, epochs=config.epochs_sparse, checkpoint_dir=None, resume=False)
    tune = replace(sparse, epochs=config.epochs_finetune, lr=config.finetune_lr)
    stages: list[Stage] = []
    with workspace(config.workdir) as work:
        if config.start.onnx is not None:
            stages.append(run_on_main(partial(measure, "input", Path(config.start.onnx), val)))
        if config.epochs_sparse:
            log.info("sparsity training: %d epochs, lambda %g", config.epochs_sparse, lam)
            fit(module, train, val, sparse, callbacks=[BNSparsity(lam)])
        label = "sparsity-trained" if config.epochs_sparse else "start"
        current = export_stage(module, label, work / "sparse.onnx", val)
        stages.append(current)
        for index in range(1, config.passes + 1):
            pruning = partial(
                slim_prune,
                current.path,
                config.ratio,
                min_channels=config.min_channels,
                max_ratio=config.max_ratio,
            )
            current = prune_stage(module, pruning, f"pass {index} pruned", work / f"pruned{index}.onnx", val)
            stages.append(current)
            if config.epochs_finetune:
                callbacks = [] if index == config.passes else [BNSparsity(lam)]
                fit(module, train, val, tune, callbacks=callbacks, teacher=teacher)
                current = export_stage(module, f"pass {index} fine-tuned", work / f"slim{index}.onnx", val)
                stages.append(current)
        output = publish(current, config.output)
    stages[-1] = replace(stages[-1], path=output)
    return SlimmingResult(output, stages, lam=lam)
