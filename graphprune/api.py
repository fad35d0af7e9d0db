"""The Python API: analyse, score, plan, prune, verify.  Every CLI command is a thin wrapper of these."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, analyze
from graphprune.criteria import Criterion, ScoringInputs, get_criterion
from graphprune.criteria.base import GateGradientSums
from graphprune.criteria.tensors import ActivationStats, collect_activations
from graphprune.data.dataset import ArrayDataset
from graphprune.data.sources import load_calibration
from graphprune.errors import GraphPruneError
from graphprune.model_io import LoadedModel, as_loaded, clean, save_model
from graphprune.onnxutil import sha256_file
from graphprune.planning import PlanOptions, RemovalPlanner
from graphprune.planning.plan import PruningPlan
from graphprune.runtime.cost import CostReport, count_cost
from graphprune.runtime.shapes import (
    InputShapes,
    restore_inputs,
    run_intermediates,
    symbolic_spatial_inputs,
    tensor_shapes,
    with_input_shapes,
)
from graphprune.search import blend  # noqa: F401  (registers the 'blend' criterion)
from graphprune.surgery.apply import apply_removal
from graphprune.surgery.verify import VerificationReport, verify_pruning

log = logging.getLogger(__name__)

ModelInput = LoadedModel | onnx.ModelProto | str | os.PathLike[str]


def analyze_model(model: ModelInput, input_shapes: InputShapes | None = None) -> DependencyGraph:
    """Channel-dependency analysis of a model file or proto (cleaned first; shapes from onnxruntime);
    `input_shapes` sizes symbolic input axes (dynamic H/W), which are otherwise measured at 1."""
    return _analyze(_sized(as_loaded(model).proto, input_shapes))


def _analyze(model: onnx.ModelProto) -> DependencyGraph:
    cleaned = clean(model)
    return analyze(cleaned, tensor_shapes(cleaned), run_intermediates)


def _sized(model: onnx.ModelProto, input_shapes: InputShapes | None) -> onnx.ModelProto:
    """The model with `input_shapes` applied; warns when spatial sizes stay symbolic (measured at 1)."""
    sized = with_input_shapes(model, input_shapes or {})
    symbolic = symbolic_spatial_inputs(sized)
    if symbolic:
        log.warning(
            "input %s has symbolic spatial sizes, measured at 1 (MACs and verification too); give "
            "--input-shape %s:1x3x224x224 (input_shapes=) with the real sizes",
            symbolic[0],
            symbolic[0],
        )
    return sized


def model_cost(model: onnx.ModelProto) -> CostReport:
    return count_cost(model, tensor_shapes(model))


def torch_gate_gradients(
    model: onnx.ModelProto,
    gate_shapes: list[tuple[int, ...]],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    mode: str,
) -> GateGradientSums:
    """The Taylor criterion's gate gradients (criteria.base.GateGradients) from
    graphprune.torch_bridge.taylor, imported on first use so that scoring without Taylor needs no torch."""
    try:
        from graphprune.torch_bridge.taylor import gate_gradients
    except ImportError as exc:
        raise GraphPruneError(
            f"criterion 'taylor' needs torch and onnx2torch ({exc}); install graphprune[torch]."
        ) from exc
    return gate_gradients(model, gate_shapes, batches, mode)


def score_channels(
    dep: DependencyGraph,
    criterion: str = "l1",
    *,
    aggregate: str = "sum",
    seed: int = 0,
    calib: ArrayDataset | str | None = None,
    calib_samples: int | None = None,
    activations: ActivationStats | None = None,
    criterion_options: dict[str, object] | None = None,
    planner: RemovalPlanner | None = None,
    threads: int | None = None,
) -> dict[int, np.ndarray]:
    """Per-group channel scores from a registered criterion (groups it has no opinion on are absent).

    calib: calibration images (an ArrayDataset or a dataset spec such as "fashion-mnist"), of which
    `calib_samples` are drawn (seeded); activation statistics are collected from them when the
    criterion reads activations and `activations` does not already hold them.  criterion_options go to
    the criterion's constructor (e.g. {"config": BlendConfig(...)} for "blend").  threads: onnxruntime
    intra-op threads of calibration (default: onnxruntime's own choice)."""
    scoring = Scoring(criterion, aggregate, seed, calib, calib_samples, criterion_options, threads)
    return scoring.run(dep, activations, planner)[0]


@dataclass(frozen=True)
class Scoring:
    """How channels are scored: the criterion and its settings, the calibration data, the threads."""

    criterion: str = "l1"
    aggregate: str = "sum"
    seed: int = 0
    calib: ArrayDataset | str | None = None
    calib_samples: int | None = None
    criterion_options: dict[str, object] | None = None
    threads: int | None = None

    def run(
        self,
        dep: DependencyGraph,
        activations: ActivationStats | None = None,
        planner: RemovalPlanner | None = None,
    ) -> tuple[dict[int, np.ndarray], Criterion]:
        """Per-group scores and the prepared criterion (for its summary)."""
        scorer = get_criterion(self.criterion, aggregate=self.aggregate, **(self.criterion_options or {}))
        data = load_calibration(self.calib, self.calib_samples, self.seed) if self.calib is not None else None
        needed = scorer.required_statistics()
        if needed and data is not None and (activations is None or not needed <= activations.statistics):
            activations = collect_activations(dep, data, statistics=needed, threads=self.threads)
        inputs = ScoringInputs(
            dep,
            seed=self.seed,
            activations=activations,
            calibration=data,
            planner=planner,
            gate_gradients=torch_gate_gradients,
        )
        scorer.prepare(inputs)
        scores = {}
        for group in dep.prunable_groups:
            values = scorer.score_group(inputs, group)
            if values is not None:
                scores[group.index] = values
        return scores, scorer


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
    criterion_report: dict[str, object] | None = None

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
    calib: ArrayDataset | str | None = None,
    calib_samples: int | None = None,
    criterion_options: dict[str, object] | None = None,
) -> np.ndarray:
    """Score channels and choose the removal mask for the options."""
    scoring = Scoring(criterion, aggregate, seed, calib, calib_samples, criterion_options)
    return _plan(dep, options, cost, scoring)[0]


def _plan(
    dep: DependencyGraph, options: PlanOptions, cost: CostReport | None, scoring: Scoring
) -> tuple[np.ndarray, dict[str, object] | None]:
    options.validate()  # before scoring: a blend's search is long
    planner = RemovalPlanner(options, cost)
    scores, scorer = scoring.run(dep, planner=planner)
    if not scores:
        log.warning("criterion %s has no opinion on any group: nothing will be removed", scoring.criterion)
    return planner(dep, scores), scorer.summary()


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
    calib: ArrayDataset | str | None = None,
    calib_samples: int | None = None,
    criterion_options: dict[str, object] | None = None,
    threads: int | None = None,
    force: bool = False,
    input_shapes: InputShapes | None = None,
) -> PruneResult:
    """Prune a model by options (ratio, global ranking, MACs target) or by replaying a saved plan,
    and prove the result equal to the masked reference unless `verify` is False.

    Criteria that read activations, gradients or a held-out split (mean_act, apoz, hrank, entropy,
    act_var, taylor, blend) take their calibration data from `calib` (see score_channels); the
    criterion's own report (the blend search's) comes back as `criterion_report`.  threads: onnxruntime
    intra-op threads of calibration and verification (default: onnxruntime's own choice).  A replayed
    plan made for another model file is refused (PlanError) unless `force`, which only logs a warning.
    input_shapes: sizes of symbolic input axes (dynamic H/W) for MACs, planning and verification; the
    written model keeps its inputs symbolic.  A MACs target on symbolic spatial sizes is refused."""
    loaded = as_loaded(model)
    sha = sha256_file(loaded.path) if loaded.path is not None else None
    if plan is not None:
        plan.check_model(sha, _label(loaded), force=force)
    sized = _sized(loaded.proto, input_shapes)
    if plan is None and options is not None and options.target_macs is not None:
        _require_sizes(sized)
    dep = _analyze(sized)
    before = count_cost(dep.model, dep.shapes)
    criterion_report = None
    if plan is not None:
        removed = plan.removed_mask(dep)
        settings = plan.settings
    else:
        options = options or PlanOptions(ratio=0.5)
        scoring = Scoring(criterion, aggregate, seed, calib, calib_samples, criterion_options, threads)
        removed, criterion_report = _plan(dep, options, before, scoring)
        settings = {k: v for k, v in vars(options).items() if v not in (None, [], False)}
    pruned = apply_removal(dep, removed)
    report = verify_pruning(dep, removed, pruned, tolerance=tolerance, threads=threads) if verify else None
    after = model_cost(pruned)
    restore_inputs(pruned, loaded.proto)
    new_plan = PruningPlan.from_removed(
        dep, removed, criterion=plan.criterion if plan else criterion, settings=settings, model_sha256=sha
    )
    return PruneResult(
        pruned, new_plan, removed, before, after, report, dep, loaded.external_data, criterion_report
    )


def verify_plan(
    original: ModelInput,
    pruned: ModelInput,
    plan: PruningPlan,
    *,
    tolerance: float = 1e-4,
    force: bool = False,
    input_shapes: InputShapes | None = None,
) -> VerificationReport:
    """Check an existing pruned model against the masked reference of `original` under `plan` (refused,
    unless `force`, when the plan was made for another model file) on inputs sized by `input_shapes`."""
    loaded = as_loaded(original)
    if loaded.path is not None:
        plan.check_model(sha256_file(loaded.path), _label(loaded), force=force)
    dep = _analyze(_sized(loaded.proto, input_shapes))
    return verify_pruning(dep, plan.removed_mask(dep), as_loaded(pruned).proto, tolerance=tolerance)


def _label(loaded: LoadedModel) -> str:
    return loaded.path.name if loaded.path is not None else "the given model"


def _require_sizes(model: onnx.ModelProto) -> None:
    """A MACs target planned at 1x1 would be met on paper only: refuse it on symbolic spatial sizes."""
    symbolic = symbolic_spatial_inputs(model)
    if symbolic:
        raise GraphPruneError(
            f"input {symbolic[0]} has symbolic spatial sizes, so MACs would be counted at 1x1 and a MACs "
            f"target planned on them; give the real sizes, e.g. --input-shape {symbolic[0]}:1x3x224x224."
        )
