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

Under torchrun (``torchrun --nproc_per_node=N -m graphprune.cli slim ...``) every rank trains (DDP, see
`train.fit`), but only rank 0 exports, prunes, evaluates in onnxruntime and writes files (intermediate
models, the output); the others wait for it. After each prune, every rank folds rank 0's pruned graph
back onto its own module, so all ranks go on from identical modules (widths and weights). Every rank
returns the same result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import onnx
import torch
from torch import nn

from graphprune.api import PruneResult, prune
from graphprune.errors import GraphPruneError, PlanError
from graphprune.planning import PlanOptions
from graphprune.recipes.workspace import (
    RecipeResult,
    Stage,
    Start,
    export_stage,
    measure,
    prune_stage,
    publish,
    workspace,
)
from graphprune.torch_bridge.distill import Teacher
from graphprune.torch_bridge.train import (
    Callback,
    TrainConfig,
    TrainState,
    fit,
    init_distributed,
    run_on_main,
)

log = logging.getLogger(__name__)

LAMBDA_PLAIN = 1e-4
LAMBDA_RESIDUAL = 1e-5
# Just under 1: PlanOptions needs max_ratio < 1, and only min_channels should limit a layer.
NO_CAP = 1.0 - 1e-9


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
    metadata = config.start.model_metadata(train)
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
        current = export_stage(module, label, work / "sparse.onnx", val, metadata)
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
                slim = work / f"slim{index}.onnx"
                current = export_stage(module, f"pass {index} fine-tuned", slim, val, metadata)
                stages.append(current)
        output = publish(current, config.output)
    stages[-1] = replace(stages[-1], path=output)
    return SlimmingResult(output, stages, lam=lam)
