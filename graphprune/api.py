"""The Python API: analyse, score, plan, prune, verify, recover.  Every CLI command is a thin wrapper of
these."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, analyze
from graphprune.criteria import Criterion, ScoringInputs, get_criterion
from graphprune.criteria.base import GateGradientSums
from graphprune.criteria.tensors import ActivationStats, collect_activations
from graphprune.data.dataset import ArrayDataset
from graphprune.data.image_norm import OWN_STATISTICS
from graphprune.data.sources import load_calibration
from graphprune.errors import CalibrationError, GraphPruneError, PlanError, VerificationError
from graphprune.model_io import (
    LoadedModel,
    as_loaded,
    clean,
    image_norm_metadata,
    input_image_norm,
    model_sha256,
    save_model,
    set_metadata,
)
from graphprune.planning import PlanOptions, RemovalPlanner
from graphprune.planning.latency import LatencyModel, layer_specs
from graphprune.planning.plan import KERNEL_MULTIPLE, PruningPlan
from graphprune.runtime.cost import CostReport, count_cost
from graphprune.runtime.profile import (
    LatencyTable,
    Timing,
    measure_wholes,
    profile_model,
    pruned_in_model_scales,
)
from graphprune.runtime.shapes import (
    InputShapes,
    image_shape,
    restore_inputs,
    run_intermediates,
    symbolic_spatial_inputs,
    tensor_shapes,
    with_input_shapes,
)
from graphprune.search import blend  # noqa: F401  (registers the 'blend' criterion)
from graphprune.surgery.apply import apply_removal
from graphprune.surgery.recover import METHODS, RecoveryConfig, RecoveryReport, agreement, recover_model
from graphprune.surgery.verify import VerificationReport, verify_pruning

log = logging.getLogger(__name__)

ModelInput = LoadedModel | onnx.ModelProto | str | os.PathLike[str]
RECOVERY_HOLDOUT = 256  # calibration images kept apart to measure a recovery, never fitted on


def analyze_model(model: ModelInput, input_shapes: InputShapes | None = None) -> DependencyGraph:
    """Channel-dependency analysis of a model file or proto (cleaned first; shapes from onnxruntime);
    `input_shapes` sizes symbolic input axes (dynamic H/W), which are otherwise measured at 1."""
    return _analyze(_sized(as_loaded(model).proto, input_shapes))


def _analyze(model: onnx.ModelProto) -> DependencyGraph:
    cleaned = clean(model)
    return analyze(cleaned, tensor_shapes(cleaned), run_intermediates)


def _sized(
    model: onnx.ModelProto, input_shapes: InputShapes | None, required: str | None = None
) -> onnx.ModelProto:
    """The model with `input_shapes` applied.  Spatial sizes left symbolic are measured at 1: refused
    when `required` says what a target would then be counted or timed on (a MACs or latency target
    planned at 1x1 would be met on paper only), else a warning."""
    sized = with_input_shapes(model, input_shapes or {})
    symbolic = symbolic_spatial_inputs(sized)
    if symbolic and required:
        raise GraphPruneError(
            f"input {symbolic[0]} has symbolic spatial sizes, so {required} at 1x1; give the real sizes, "
            f"e.g. --input-shape {symbolic[0]}:1x3x224x224."
        )
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
    image_norm: str | None = None,
) -> dict[int, np.ndarray]:
    """Per-group channel scores from a registered criterion (groups it has no opinion on are absent).

    calib: calibration images (an ArrayDataset or a dataset spec such as "fashion-mnist"), of which
    `calib_samples` are drawn (seeded); activation statistics are collected from them when the
    criterion reads activations and `activations` does not already hold them; `image_norm` says how a
    spec's 8-bit images become inputs ("data", "imagenet", MEAN/STD...: graphprune.data.image_norm;
    default: as the model records, else the data's own statistics).  criterion_options go to the
    criterion's constructor (e.g. {"config": BlendConfig(...)} for "blend").  threads: onnxruntime
    intra-op threads of calibration (default: onnxruntime's own choice)."""
    scoring = Scoring(
        criterion, aggregate, seed, calib, calib_samples, criterion_options, threads, image_norm
    )
    return scoring.run(dep, activations, planner)[0]


@dataclass(frozen=True)
class Scoring:
    """How channels are scored: the criterion and its settings, the calibration data (which recovery
    fits on too) and how it is normalised, the threads."""

    criterion: str = "l1"
    aggregate: str = "sum"
    seed: int = 0
    calib: ArrayDataset | str | None = None
    calib_samples: int | None = None
    criterion_options: dict[str, object] | None = None
    threads: int | None = None
    image_norm: str | None = None

    def calibration(self, dep: DependencyGraph, samples: int | None) -> ArrayDataset:
        """`samples` calibration images (seeded), a spec's fitted to the model's input and normalised as
        `image_norm` says, else as the model records."""
        assert self.calib is not None
        image_norm = (
            input_image_norm(dep.model, self.image_norm) if isinstance(self.calib, str) else self.image_norm
        )
        return load_calibration(self.calib, samples, self.seed, image_shape(dep.model), image_norm)

    def run(
        self,
        dep: DependencyGraph,
        activations: ActivationStats | None = None,
        planner: RemovalPlanner | None = None,
    ) -> tuple[dict[int, np.ndarray], Criterion]:
        """Per-group scores and the prepared criterion (for its summary)."""
        scorer = get_criterion(self.criterion, aggregate=self.aggregate, **(self.criterion_options or {}))
        data = self.calibration(dep, self.calib_samples) if self.calib is not None else None
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
    recovery: RecoveryReport | None = None

    def save(self, path: str | os.PathLike[str], plan_path: str | os.PathLike[str] | None = None) -> Path:
        """Write the model (and its plan) atomically; external data stays external."""
        written = save_model(self.model, path, external_data=self.external_data)
        if plan_path is not None:
            self.plan.save(plan_path)
        return written


@dataclass(frozen=True)
class LatencySource:
    """Where a latency target's table comes from: a saved one (`table`, refused when it was measured on
    another provider or batch than those given, or on another model), or else a profile taken now
    with these settings (None: cpu, batch 1).  feedback: how many times a latency-targeted plan is
    timed whole and planned again on the measured latency (0: trust the table alone)."""

    table: LatencyTable | str | os.PathLike[str] | None = None
    provider: str | None = None
    batch: int | None = None
    threads: int | None = None
    feedback: int = 2

    def __post_init__(self) -> None:
        if self.feedback < 0:
            raise GraphPruneError(f"--latency-feedback must be 0 or more, got {self.feedback}.")


def profile_latency(
    model: ModelInput,
    *,
    provider: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    timing: Timing | None = None,
    input_shapes: InputShapes | None = None,
) -> LatencyTable:
    """Latency lookup table of a model's weighted layers and of the whole (graphprune.runtime.profile),
    calibrated on uniformly pruned copies; `input_shapes` sizes symbolic input axes (dynamic H/W, else
    timed at 1), as prune must size them to plan with the table."""
    loaded = as_loaded(model)
    sha = model_sha256(loaded.path) if loaded.path is not None else None
    sized = _sized(loaded.proto, input_shapes, "its layers and the whole would be timed")
    return _profile(_analyze(sized), sha, LatencySource(None, provider, batch, threads), timing)


# Uniform ratios of the pruned copies timed with a profile: all but the last fit the line from the
# layers' sum to the whole, the last checks it.
CALIBRATION_RATIOS = (0.5, 0.75, 0.3)
# A fit that misses its check copy by more than this share is timed again (each model's fastest of
# the timings counts), up to this many times: a neighbour's burst that slowed some of the copies but
# not the others bent the fit (mobilenet_v2's check copy timed slower than the whole model, 38% off).
CALIBRATION_TOLERANCE = 0.1
CALIBRATION_RETIMES = 2
# Profiles of the layers (each point at its fastest profile) while the fit still misses its check copy:
# a neighbour that stole the second vCPU for the whole of a profile slowed mobilenet_v2's narrow
# layers up to 2x and its wide ones 1.2x, and the fit missed its check copy by 37% however often the
# copies were timed again.
PROFILE_ATTEMPTS = 2


def _profile(
    dep: DependencyGraph, sha: str | None, source: LatencySource, timing: Timing | None = None
) -> LatencyTable:
    batch = 1 if source.batch is None else source.batch
    where = {"provider": source.provider or "cpu", "batch": batch, "threads": source.threads}
    specs = layer_specs(dep)
    table = profile_model(dep.model, specs, timing=timing, model_sha256=sha, **where)
    for attempt in range(PROFILE_ATTEMPTS):
        if attempt:
            log.info(
                "timing the layers again: the fit missed its check copy by more than %.0f%%",
                100 * CALIBRATION_TOLERANCE,
            )
            # at the first profile's alignment: a probe taken in a slow spell can find another one,
            # and with it other widths to time, which no point-wise minimum can merge
            same_widths = replace(timing or Timing(), block=table.block)
            again = profile_model(dep.model, specs, timing=same_widths, model_sha256=sha, **where)
            table = table.fastest_with(again)
        if _calibrate(dep, table, where, timing):
            return table
    log.warning(
        "the latency table's fit misses its check copy by %+.0f%% after %d profiles: the machine's speed "
        "changed while profiling (another job?); plans made with it are timed whole (--latency-feedback), "
        "or profile again on a quiet machine",
        100 * (table.check_error or 0),
        PROFILE_ATTEMPTS,
    )
    return table


def _calibrate(
    dep: DependencyGraph, table: LatencyTable, where: dict[str, Any], timing: Timing | None
) -> bool:
    """Time uniformly pruned copies whole beside the model, each as its share of the model's time in
    the same rounds (times the table's whole), fit the table's line through all but the last, and
    check it on the last; True when the check holds."""
    model = LatencyModel(dep, table)
    zeros = {g.index: np.zeros(g.size) for g in dep.prunable_groups}
    # the copies' widths snap to the table's fast steps, as every plan made with the table will
    removals = [RemovalPlanner(PlanOptions(ratio=r), latency=model)(dep, zeros) for r in CALIBRATION_RATIOS]
    copies = [apply_removal(dep, removed) for removed in removals]
    if table.provider == "cpu" and table.in_model_ms:
        table.in_model_points = _in_model_points(model, removals, copies, where, timing)
        model = LatencyModel(dep, table)
    kernels = [model.kernels_ms(removed) for removed in removals]
    quiet = {"timing": timing, "canary_ms": table.canary_ms, "expected_ms": table.end_to_end_ms, **where}
    times = np.asarray(measure_wholes([dep.model, *copies], **quiet))
    for attempt in range(CALIBRATION_RETIMES + 1):
        if attempt:
            times = np.minimum(times, measure_wholes([dep.model, *copies], **quiet))
        shares = times[1:] / times[0]
        table.end_to_end_ms = min(table.end_to_end_ms, float(times[0]))
        points = list(zip(kernels, (table.end_to_end_ms * shares).tolist(), strict=True))
        table.calibration, table.check_point = points[:-1], points[-1]
        log.info("latency fit %s; check point off by %+.1f%%", table.fit, 100 * (table.check_error or 0))
        if abs(table.check_error or 0) <= CALIBRATION_TOLERANCE:
            return True
    return False


def _in_model_points(
    model: LatencyModel,
    removals: list[np.ndarray],
    copies: list[onnx.ModelProto],
    where: dict[str, Any],
    timing: Timing | None,
) -> dict[str, list[tuple[float, float]]]:
    """Each layer's (share of its weights kept, in-model scale) in the pruned copies, where it was
    pruned: a layer's cold-weight penalty inside the model fades as its weights shrink to fit the cache."""
    points: dict[str, list[tuple[float, float]]] = {}
    for removed, copy in zip(removals, copies, strict=True):
        removed_class = model.class_mask(removed)
        kept = {layer.spec.node: (layer, model.widths(layer, removed_class)) for layer in model.layers}
        shares = {node: layer.spec.weight_share(*widths) for node, (layer, widths) in kept.items()}
        # every layer sets the copy's pace; the pruned ones get points
        alone = {node: layer.curve.latency(*widths) for node, (layer, widths) in kept.items()}
        scales = pruned_in_model_scales(
            copy,
            alone,
            batch=where["batch"],
            threads=where["threads"],
            timing=timing or Timing(),
            expected_ms=model.table.end_to_end_ms,
        )
        for node, scale in scales.items():
            if shares[node] < 1.0:
                points.setdefault(node, []).append((shares[node], scale))
    return points


def _latency_model(dep: DependencyGraph, source: LatencySource, sha: str | None) -> LatencyModel:
    table = source.table
    if table is None:
        log.info("no latency table given: profiling the model now")
        table = _profile(dep, sha, source)
    elif not isinstance(table, LatencyTable):
        table = LatencyTable.load(table)
    table.check(sha, source.provider, source.batch)
    return LatencyModel(dep, table)


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
    image_norm: str | None = None,
) -> np.ndarray:
    """Score channels and choose the removal mask for the options."""
    scoring = Scoring(
        criterion, aggregate, seed, calib, calib_samples, criterion_options, image_norm=image_norm
    )
    return _plan(dep, options, cost, scoring)[0]


def _plan(
    dep: DependencyGraph,
    options: PlanOptions,
    cost: CostReport | None,
    scoring: Scoring,
    latency: LatencyModel | None = None,
    feedback: int = 0,
) -> tuple[np.ndarray, dict[str, object] | None]:
    options.validate()  # before scoring: a blend's search is long
    planner = RemovalPlanner(options, cost, latency)
    scores, scorer = scoring.run(dep, planner=planner)
    if not scores:
        log.warning("criterion %s has no opinion on any group: nothing will be removed", scoring.criterion)
    removed = planner(dep, scores)
    if latency is not None and feedback and options.target_latency is not None:
        target_ms = options.target_latency * latency.original_ms
        removed = _measured_feedback(dep, latency, removed, lambda: planner(dep, scores), feedback, target_ms)
    return removed, scorer.summary()


# A plan timed whole within this share of its prediction is kept without planning again.
FEEDBACK_TOLERANCE = 0.03
FEEDBACK_TIMING = Timing(rounds=3)
# A plan timed this far off its prediction is timed again before the miss is trusted: on a shared
# machine a neighbour's burst can slow every round of one model of the pair by 1.7x for seconds.
FEEDBACK_RETIME = 0.2


def _measured_feedback(
    dep: DependencyGraph,
    model: LatencyModel,
    removed: np.ndarray,
    replan: Callable[[], np.ndarray],
    rounds: int,
    target_ms: float,
) -> np.ndarray:
    """Time the plan whole beside the original, as the table's copies were timed, and while it measures
    off its prediction plan again on the line through the measured points (the table's layers are
    timed alone, and a plan that cuts layers unevenly strays from the uniform copies its fit saw), up to
    `rounds` times.  A plan's latency counts as its share of the original's in the same rounds, times
    the table's whole, so a machine that got slower or faster since the profile does not move the
    target.  Every plan returned was timed: of those measured within the target, the slowest (they lie
    on one allocation path, so it keeps the most), else the fastest, with a warning (also when the
    timings put the target out of reach of any plan)."""
    timed: list[tuple[float, np.ndarray]] = []
    for attempt in range(rounds + 1):
        check = model.add_timing(removed, _share_of_original(dep, model, removed))
        timed.append((check["measured_ms"], removed))
        log.info(
            "latency feedback: predicted %.3f ms, measured %.3f ms",
            check["predicted_ms"],
            check["measured_ms"],
        )
        if abs(check["predicted_ms"] / check["measured_ms"] - 1.0) <= FEEDBACK_TOLERANCE or attempt == rounds:
            break
        try:
            removed = replan()
        except PlanError as exc:  # the timings put the target out of reach: keep to the timed plans
            log.info("latency feedback: no further plan (%s)", exc)
            break
        if any(np.array_equal(removed, earlier) for _, earlier in timed):
            break  # planned again onto a plan already timed
    within = [pair for pair in timed if pair[0] <= target_ms * (1 + FEEDBACK_TOLERANCE)]
    if within:
        return max(within, key=lambda pair: pair[0])[1]
    measured, removed = min(timed, key=lambda pair: pair[0])
    log.warning(
        "no plan timed whole met the latency target (%.3f ms): the closest measured %.3f ms; raise "
        "--latency-feedback, or profile again on a quiet machine",
        target_ms,
        measured,
    )
    return removed


def _share_of_original(dep: DependencyGraph, model: LatencyModel, removed: np.ndarray) -> float:
    """The plan's whole latency (ms) as the table would have measured it: its share of the original's in
    the same timing rounds, times the table's whole; timed again (fastest of both) when far off the
    prediction."""
    table = model.table
    pair = [dep.model, apply_removal(dep, removed)]
    original_ms, measured = _time_whole(pair, table)
    if abs(table.end_to_end_ms * measured / original_ms / model.predict(removed) - 1.0) > FEEDBACK_RETIME:
        original_ms, measured = np.minimum([original_ms, measured], _time_whole(pair, table)).tolist()
    return table.end_to_end_ms * measured / original_ms


def _time_whole(models: list[onnx.ModelProto], table: LatencyTable) -> list[float]:
    return measure_wholes(
        models,
        provider=table.provider,
        batch=table.batch,
        threads=table.threads,
        timing=FEEDBACK_TIMING,
        canary_ms=table.canary_ms,
    )


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
    recover: str | None = None,
    latency: LatencySource | None = None,
    force: bool = False,
    input_shapes: InputShapes | None = None,
    image_norm: str | None = None,
) -> PruneResult:
    """Prune a model by options (ratio, global ranking, MACs or latency target) or by replaying a saved
    plan, and prove the result equal to the masked reference unless `verify` is False.

    Criteria that read activations, gradients or a held-out split (mean_act, apoz, hrank, entropy,
    act_var, taylor, blend) take their calibration data from `calib`, normalised as `image_norm` says
    (see score_channels; a fixed one given is recorded in the written model); the
    criterion's own report (the blend search's) comes back as `criterion_report`.  threads: onnxruntime
    intra-op threads of calibration and verification (default: onnxruntime's own choice).  A replayed
    plan made for another model file is refused (PlanError) unless `force`, which only logs a warning.
    input_shapes: sizes of symbolic input axes (dynamic H/W) for MACs, planning and verification; the
    written model keeps its inputs symbolic.  A MACs or latency target on symbolic spatial sizes is refused.

    recover: "none", "bn" or "lsq" (see graphprune.surgery.recover; default "bn" when `calib` is given,
    else "none"), applied after verification on `calib_samples` calibration images; how close the
    result is to the original on RECOVERY_HOLDOUT further images (a fifth of the data when
    calib_samples is None or the data runs short) is in `recovery` and the plan's settings["recovery"].

    latency: the latency table (a latency target profiles the model when none is given); the plan
    records the latency it predicts."""
    method = recover if recover is not None else ("bn" if calib is not None else "none")
    check_recovery(method, calib)
    if criterion == "blend" and plan is None and method == "none":
        log.warning(
            "the blend scored its candidates with BN recalibrated, but recover='none' writes them without"
        )
    loaded = as_loaded(model)
    sha = model_sha256(loaded.path) if loaded.path is not None else None
    if plan is not None:
        plan.check_model(sha, _label(loaded), force=force)
    options = options or PlanOptions(ratio=0.5)
    if latency is None and plan is None and options.needs_latency:
        latency = LatencySource(threads=threads)
    required = None
    if plan is None and options.target_macs is not None:
        required = "MACs would be counted and a MACs target planned on them"
    elif latency is not None:
        required = "its latency would be profiled and planned on"
    sized = _sized(loaded.proto, input_shapes, required)
    dep = _analyze(sized)
    before = count_cost(dep.model, dep.shapes)
    criterion_report = None
    latency_model = _latency_model(dep, latency, sha) if latency is not None else None
    scoring = Scoring(
        criterion, aggregate, seed, calib, calib_samples, criterion_options, threads, image_norm
    )
    if plan is not None:
        removed = plan.removed_mask(dep)
        settings = plan.settings
    else:
        feedback = latency.feedback if latency is not None else 0  # _plan times latency targets only
        removed, criterion_report = _plan(dep, options, before, scoring, latency_model, feedback)
        settings = {k: v for k, v in vars(options).items() if v not in (None, [], False)}
    pruned = apply_removal(dep, removed)
    report = verify_pruning(dep, removed, pruned, tolerance=tolerance, threads=threads) if verify else None
    settings = {k: v for k, v in settings.items() if k != "recovery"}
    recovery = None
    if method != "none":
        pruned, recovery = _recover(dep, removed, pruned, scoring, method)
        settings["recovery"] = recovery.as_dict()
    after = model_cost(pruned)
    restore_inputs(pruned, loaded.proto)
    if image_norm not in (None, OWN_STATISTICS):
        set_metadata(pruned, image_norm_metadata(image_norm))
    new_plan = PruningPlan.from_removed(
        dep,
        removed,
        criterion=plan.criterion if plan else criterion,
        settings=settings,
        model_sha256=sha,
        latency=_predicted(latency_model, removed),
    )
    if plan is None and latency_model is None:
        _warn_misaligned(new_plan, len(dep.prunable_groups), options.round_to)
    return PruneResult(
        pruned,
        new_plan,
        removed,
        before,
        after,
        report,
        dep,
        loaded.external_data,
        criterion_report,
        recovery,
    )


def _warn_misaligned(plan: PruningPlan, prunable: int, round_to: int) -> None:
    """Warn when a plan leaves widths off the CPU kernels' channel blocks (the trap of a plain ratio or
    MACs target: a 30% uniform prune of torchvision's mobilenet_v2 ran at 0.90x the original's speed,
    benchmarks/results/round_to_mobilenet_v2.md)."""
    if round_to % KERNEL_MULTIPLE == 0:
        return
    found = plan.misaligned()
    if found:
        log.warning(
            "%d of %d prunable groups keep a width that is not a multiple of %d (%s%s): onnxruntime's CPU "
            "kernels run such widths on slower paths, which can leave the model slower than the original; "
            "for speed add --round-to %d (or 16), or plan with --latency-lut / --target-latency",
            len(found),
            prunable,
            KERNEL_MULTIPLE,
            ", ".join(found[:3]),
            ", ..." if len(found) > 3 else "",
            KERNEL_MULTIPLE,
        )


def check_recovery(method: str, calib: object) -> None:
    """Refuse an unknown recovery method, or one that needs calibration data without it."""
    if method not in METHODS:
        raise GraphPruneError(f"recovery method must be one of {', '.join(METHODS)}, got {method!r}.")
    if method != "none" and calib is None:
        raise CalibrationError(
            f"recovery {method!r} fits the pruned model on calibration images: give calibration data "
            "(--calib DATA), or use --recover none."
        )


def _recover(
    dep: DependencyGraph,
    removed: np.ndarray,
    pruned: onnx.ModelProto,
    scoring: Scoring,
    method: str,
    ridge: float = RecoveryConfig.ridge,
) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Recover on the scoring's calib_samples calibration images and measure the result on
    RECOVERY_HOLDOUT others."""
    calib_samples, seed, threads = scoring.calib_samples, scoring.seed, scoring.threads
    samples = None if calib_samples is None else calib_samples + RECOVERY_HOLDOUT
    data = scoring.calibration(dep, samples)
    if len(data) < 2:
        raise CalibrationError(
            f"recovery needs at least 2 calibration images (one held out), got {len(data)}."
        )
    held = (
        RECOVERY_HOLDOUT
        if calib_samples is not None and len(data) >= calib_samples + RECOVERY_HOLDOUT
        else max(1, len(data) // 5)
    )
    fit, heldout = data.split(1.0 - held / len(data), seed=seed)
    config = RecoveryConfig(method, ridge=ridge, threads=threads)
    model, report = recover_model(dep, removed, pruned, fit.images, config)
    before = agreement(dep.model, pruned, heldout.images, threads=threads)
    after = agreement(dep.model, model, heldout.images, threads=threads)
    report.heldout_samples = len(heldout)
    report.agreement_before, report.agreement = before.top1, after.top1
    report.rel_error_before, report.rel_error = before.rel_error, after.rel_error
    return model, report


@dataclass
class RecoveryResult:
    """A recovered model and what the recovery did (held-out agreement with the original included)."""

    model: onnx.ModelProto
    report: RecoveryReport


def recover(
    original: ModelInput,
    pruned: ModelInput,
    calib: ArrayDataset | str,
    *,
    plan: PruningPlan,
    method: str = "lsq",
    calib_samples: int | None = 1024,
    seed: int = 0,
    ridge: float = RecoveryConfig.ridge,
    threads: int | None = None,
    image_norm: str | None = None,
) -> RecoveryResult:
    """Recover a model pruned from `original` by `plan` (surgery's output, not yet recovered): "bn"
    recalibrates BatchNorm and corrects biases, "lsq" re-fits the affected layers by least squares
    (see graphprune.surgery.recover).  Fits on `calib_samples` images (normalised as `image_norm` says),
    measures on RECOVERY_HOLDOUT more."""
    check_recovery(method, calib)
    dep = analyze_model(original)
    removed = plan.removed_mask(dep)
    data = Scoring(
        seed=seed, calib=calib, calib_samples=calib_samples, threads=threads, image_norm=image_norm
    )
    model, report = _recover(dep, removed, as_loaded(pruned).proto, data, method, ridge)
    return RecoveryResult(model, report)


def _predicted(model: LatencyModel | None, removed: np.ndarray) -> dict[str, object] | None:
    """What the plan records about latency: the table's setting, the measured whole, the prediction, and
    the plan's own whole timing when feedback timed it."""
    if model is None:
        return None
    table = model.table
    return {
        "provider": table.provider,
        "batch": table.batch,
        "threads": table.threads,
        "original_ms": table.end_to_end_ms,
        "predicted_ms": model.predict(removed),
        "measured_ms": model.measured_ms(removed),
        "table_predicted_ms": table.whole_ms(model.kernels_ms(removed)),
        "feedback": model.checks,
        "layers_sum_error": table.sum_error,
    }


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
    method = plan.settings.get("recovery", {}).get("method", "none")
    if method != "none":
        raise VerificationError(
            f"the plan says the model was recovered ({method!r}) after verification, so it no longer equals "
            "the masked reference; prune with --recover none to get a model that verify can check."
        )
    loaded = as_loaded(original)
    if loaded.path is not None:
        plan.check_model(model_sha256(loaded.path), _label(loaded), force=force)
    dep = _analyze(_sized(loaded.proto, input_shapes))
    return verify_pruning(dep, plan.removed_mask(dep), as_loaded(pruned).proto, tolerance=tolerance)


def _label(loaded: LoadedModel) -> str:
    return loaded.path.name if loaded.path is not None else "the given model"
