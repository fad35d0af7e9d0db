"""The criteria pool a blend starts from: every pool criterion scores every prunable group once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from graphprune.analysis.graph import DependencyGraph
from graphprune.criteria.base import GateGradients, ScoringInputs, get_criterion
from graphprune.criteria.tensors import collect_activations
from graphprune.data.dataset import ArrayDataset
from graphprune.errors import CalibrationError, PlanError

log = logging.getLogger(__name__)

# Weight and activation criteria; taylor (needs torch) joins when named explicitly.
DEFAULT_POOL = ("l1", "l2", "fpgm", "bn", "mean_act", "apoz", "act_var", "entropy", "hrank")


@dataclass
class PoolScores:
    """Scores per criterion per group, and the criteria that could not score this model (with why)."""

    scores: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.scores)


def pool_statistics(names: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Activation statistics the pool's criteria read together."""
    check_pool(names)
    return frozenset().union(*(get_criterion(name).required_statistics() for name in names))


def check_pool(names: tuple[str, ...] | list[str]) -> None:
    if "blend" in names:
        raise PlanError("a blend's pool cannot contain 'blend' itself; list single criteria.")
    if len(set(names)) != len(names) or not names:
        raise PlanError(f"the blend pool {list(names)} must name at least one criterion, each once.")
    for name in names:
        get_criterion(name)  # raises PlanError naming the known criteria


def score_pool(
    inputs: ScoringInputs, names: tuple[str, ...] | list[str], aggregate: str = "sum"
) -> PoolScores:
    """Every pool criterion's scores for every prunable group; a criterion the model cannot feed (bn on a
    model without BN, an activation criterion without calibration data) is skipped with its reason."""
    check_pool(names)
    pool = PoolScores()
    for name in names:
        criterion = get_criterion(name, aggregate=aggregate)
        try:
            criterion.prepare(inputs)
        except (PlanError, CalibrationError) as exc:
            pool.skipped[name] = str(exc)
            log.warning("criterion %s left out of the pool: %s", name, exc)
            continue
        scores = {}
        for group in inputs.dep.prunable_groups:
            values = criterion.score_group(inputs, group)
            if values is not None:
                scores[group.index] = np.asarray(values, dtype=np.float64)
        pool.scores[name] = scores
    if not pool.scores:
        raise PlanError(
            f"no criterion of the pool {list(names)} can score this model ({'; '.join(pool.skipped.values())})."
        )
    return pool


def pool_inputs(
    dep: DependencyGraph,
    data: ArrayDataset,
    names: tuple[str, ...] | list[str],
    *,
    seed: int = 0,
    progress: bool = True,
    gate_gradients: GateGradients | None = None,
) -> ScoringInputs:
    """Scoring inputs for a pool: the activation statistics its criteria read, collected from `data`, and
    `gate_gradients` for taylor (graphprune.api.torch_gate_gradients)."""
    needed = pool_statistics(names)
    activations = collect_activations(dep, data, statistics=needed, progress=progress) if needed else None
    return ScoringInputs(
        dep, seed=seed, activations=activations, calibration=data, gate_gradients=gate_gradients
    )
