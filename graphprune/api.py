"""The Python API: analyse, score, plan, prune, verify.  Every CLI command is a thin wrapper of these."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, analyze
from graphprune.criteria import ScoringInputs, get_criterion
from graphprune.model_io import LoadedModel, as_loaded, save_model
from graphprune.plan import PruningPlan
from graphprune.planning import Planner, PlanOptions
from graphprune.runtime.cost import CostReport, count_cost
from graphprune.runtime.shapes import tensor_shapes
from graphprune.surgery.apply import apply_removal
from graphprune.surgery.verify import VerificationReport, verify_pruning
from graphprune.util import sha256_file

log = logging.getLogger(__name__)

ModelInput = LoadedModel | onnx.ModelProto | str | os.PathLike[str]


def analyze_model(model: ModelInput) -> DependencyGraph:
    """Channel-dependency analysis of a model file or proto."""
    return analyze(as_loaded(model).proto)


def model_cost(model: onnx.ModelProto) -> CostReport:
    return count_cost(model, tensor_shapes(model))


def score_channels(
    dep: DependencyGraph, criterion: str = "l1", *, aggregate: str = "sum", seed: int = 0
) -> dict[int, np.ndarray]:
    """Per-group channel scores from a registered criterion (groups it has no opinion on are absent)."""
    scorer = get_criterion(criterion, aggregate=aggregate)
    inputs = ScoringInputs(dep, seed=seed)
    scorer.prepare(inputs)
    scores = {}
    for group in dep.prunable_groups:
        values = scorer.score_group(inputs, group)
        if values is not None:
            scores[group.index] = values
    return scores


@dataclass
class PruneResult:
    """The pruned model and everything a user wants to see about it."""

    model: onnx.ModelProto
    plan: PruningPlan
    removed: np.ndarray
    before: CostReport
    after: CostReport
    verification: VerificationReport | None
    dep: DependencyGraph = field(repr=False)
    external_data: bool = False

    def save(self, path: str | os.PathLike[str], plan_path: str | os.PathLike[str] | None = None) -> Path:
        """Write the model (and its plan) atomically; external data stays external."""
        written = save_model(self.model, path, external_data=self.external_data)
        if plan_path is not None:
            self.plan.save(plan_path)
        return written


def plan_pruning(
    dep: DependencyGraph,
    options: PlanOptions,
    *,
    criterion: str = "l1",
    aggregate: str = "sum",
    seed: int = 0,
    cost: CostReport | None = None,
) -> np.ndarray:
    """Score channels and choose the removal mask for the options."""
    scores = score_channels(dep, criterion, aggregate=aggregate, seed=seed)
    if not scores:
        log.warning("criterion %s has no opinion on any group: nothing will be removed", criterion)
    return Planner(dep, scores, options).plan(cost)


def prune(
    model: ModelInput,
    options: PlanOptions | None = None,
    *,
    plan: PruningPlan | None = None,
    criterion: str = "l1",
    aggregate: str = "sum",
    seed: int = 0,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> PruneResult:
    """Prune a model by options (ratio, global ranking, MACs target) or by replaying a saved plan,
    and prove the result equal to the masked reference unless `verify` is False."""
    loaded = as_loaded(model)
    dep = analyze(loaded.proto)
    before = count_cost(dep.model, dep.shapes)
    if plan is not None:
        removed = plan.removed_mask(dep)
        settings = plan.settings
    else:
        options = options or PlanOptions(ratio=0.5)
        removed = plan_pruning(dep, options, criterion=criterion, aggregate=aggregate, seed=seed, cost=before)
        settings = {k: v for k, v in vars(options).items() if v not in (None, [], False)}
    pruned = apply_removal(dep, removed)
    report = verify_pruning(dep, removed, pruned, tolerance=tolerance) if verify else None
    after = model_cost(pruned)
    sha = sha256_file(loaded.path) if loaded.path is not None else None
    new_plan = PruningPlan.from_removed(
        dep, removed, criterion=plan.criterion if plan else criterion, settings=settings, model_sha256=sha
    )
    return PruneResult(pruned, new_plan, removed, before, after, report, dep, loaded.external_data)


def verify_plan(
    original: ModelInput, pruned: ModelInput, plan: PruningPlan, *, tolerance: float = 1e-4
) -> VerificationReport:
    """Check an existing pruned model against the masked reference of `original` under `plan`."""
    dep = analyze(as_loaded(original).proto)
    return verify_pruning(dep, plan.removed_mask(dep), as_loaded(pruned).proto, tolerance=tolerance)
