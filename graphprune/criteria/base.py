"""Criteria: each scores the channels of a group (higher = more important).  A small registry of classes.

Criteria never import torch: what needs it (the Taylor criterion's gate gradients) comes in through
ScoringInputs as a `GateGradients` function, which graphprune.api supplies from graphprune.torch_bridge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.errors import PlanError
from graphprune.ops.context import ParamMember

if TYPE_CHECKING:
    from graphprune.criteria.tensors import ActivationStats
    from graphprune.data.dataset import ArrayDataset

AGGREGATIONS = ("sum", "mean", "max")

# Scores per group -> removal mask over atoms, under fixed plan options (picklable: the blend search's
# worker processes plan with it).
RemovalFunction = Callable[[DependencyGraph, dict[int, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class GateGradientSums:
    """Per gate, one value per channel: dL/dgate of the summed loss, summed over batches (mode "sum") or
    its absolute value summed over batches (mode "batch"); and the number of samples seen."""

    sums: list[np.ndarray]
    samples: int


# (gated model, gate shapes, labelled batches, mode) -> GateGradientSums.  The gated model takes the gates
# as extra graph inputs after the image input; graphprune.torch_bridge.taylor.gate_gradients computes it.
GateGradients = Callable[
    [onnx.ModelProto, list[tuple[int, ...]], Iterable[tuple[np.ndarray, np.ndarray]], str], GateGradientSums
]


@dataclass
class ScoringInputs:
    """What criteria may read: the analysed graph (initialisers included) and a seed; activation
    statistics and the calibration samples when the criterion asked for them; for criteria that judge a
    whole plan (blend), the planner that turns scores into a removal; and, for Taylor, the function
    that backpropagates through the gated model."""

    dep: DependencyGraph
    seed: int = 0
    activations: ActivationStats | None = None
    calibration: ArrayDataset | None = None
    planner: RemovalFunction | None = None
    gate_gradients: GateGradients | None = None


class Criterion(ABC):
    """Scores one group's channels; returning None means "no opinion": the group is left whole."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[Criterion]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            Criterion.registry[cls.name] = cls

    # Activation statistics (runtime.activations.STATISTICS) the criterion reads from calibration data.
    statistics: ClassVar[frozenset[str]] = frozenset()
    # Whether it reads the calibration samples themselves (gradients, a search judged on held-out data).
    needs_data: ClassVar[bool] = False

    def __init__(self, aggregate: str = "sum") -> None:
        if aggregate not in AGGREGATIONS:
            raise PlanError(f"unknown aggregation {aggregate!r}; choose one of {', '.join(AGGREGATIONS)}.")
        self.aggregate = aggregate

    def required_statistics(self) -> frozenset[str]:
        """The activation statistics to collect before scoring (a blend asks for its whole pool's)."""
        return self.statistics

    def prepare(self, inputs: ScoringInputs) -> None:
        """Check the model offers what the criterion reads (raise a clear error if not)."""
        return None

    def summary(self) -> dict[str, Any] | None:
        """What the criterion learned while scoring, for reports (the blend search); None for most."""
        return None

    @abstractmethod
    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None: ...


class MemberCriterion(Criterion):
    """Scores from initialiser slices: per-position values of chosen member kinds, gathered per class."""

    kinds: ClassVar[frozenset[str]]

    @abstractmethod
    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray: ...

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None:
        dep = inputs.dep
        rows = [
            class_row(dep, group, member.atoms, self.position_scores(dep.constants[member.name], member))
            for member in group.members
            if member.kind in self.kinds
        ]
        return combine_rows(rows, self.aggregate)


def class_row(dep: DependencyGraph, group: Group, atoms: np.ndarray, per_position: np.ndarray) -> np.ndarray:
    """Per-position values (one per atom of a member or tensor) summed into the group's classes; NaN
    where no position of `atoms` falls on a class."""
    inside, slots = dep.slots(atoms, group)
    totals = np.zeros(group.size)
    np.add.at(totals, slots[inside], per_position[inside])
    row = np.full(group.size, np.nan)
    touched = np.unique(slots[inside])
    row[touched] = totals[touched]
    return row


def combine_rows(rows: list[np.ndarray], aggregate: str) -> np.ndarray | None:
    """One score per class from several members' rows (NaN = the member does not touch the class)."""
    if not rows:
        return None
    stacked = np.vstack(rows)
    reducer = {"sum": np.nansum, "mean": np.nanmean, "max": np.nanmax}[aggregate]
    return np.nan_to_num(reducer(stacked, axis=0))


def position_norms(values: np.ndarray, member: ParamMember, order: int) -> np.ndarray:
    """|w|^order summed over everything but the member's channel axis (ungrouped; see `axis_norms` for
    the axes 0 and 1 of a weight).  The power is taken in the weights' own precision and only the sums
    are float64: casting a whole ResNet-50 to float64 first was most of the time of L1 scoring."""
    powered = np.abs(values) if order == 1 else np.abs(values) ** order
    axes = tuple(a for a in range(values.ndim) if a != member.axis)
    return powered.sum(axis=axes, dtype=np.float64) if axes else powered.astype(np.float64)


def axis_norms(values: np.ndarray, order: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """What `position_norms` gives along axis 0 and along axis 1 (per group) of a weight of 2+ dims, from
    one pass of |w|^order: a weight is a member twice (its layer's outputs and its inputs), and on
    wide models taking the power twice and reducing strided axes in float64 was most of the L1 scoring
    time.  The large sums stay in float32 (relative error ~1e-6) and what is left of the reduction runs
    in float64.  Down the columns numpy's own reduction, not a BLAS product: a threaded BLAS call on
    a freshly written array took 10-20x longer on a busy 2-core machine (convnext_tiny's scoring
    went from 0.24 s to 0.02 s).  Half-precision weights are summed in float32."""
    values = values.astype(np.promote_types(values.dtype, np.float32), copy=False)
    powered = np.abs(values) if order == 1 else np.abs(values) ** order
    rows = powered.reshape(powered.shape[0], -1)
    along_0 = rows.sum(axis=1).astype(np.float64)
    columns = rows.reshape(groups, -1, rows.shape[1]).sum(axis=1)
    along_1 = columns.reshape(groups * powered.shape[1], -1).sum(axis=1, dtype=np.float64)
    return along_0, along_1


def get_criterion(name: str, **options: object) -> Criterion:
    try:
        cls = Criterion.registry[name]
    except KeyError:
        known = ", ".join(sorted(Criterion.registry))
        raise PlanError(f"unknown criterion {name!r}; choose one of {known}.") from None
    return cls(**options)
