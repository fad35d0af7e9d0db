"""Weight criteria: L1 and L2 magnitude, BN |gamma| (Network Slimming), and a seeded random baseline."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from graphprune.analysis.graph import Group
from graphprune.criteria.base import (
    Criterion,
    MemberCriterion,
    ScoringInputs,
    axis_norms,
    position_norms,
)
from graphprune.errors import PlanError
from graphprune.ops.context import MemberKind, ParamMember

WEIGHT_KINDS = frozenset(
    {MemberKind.CONV_OUT, MemberKind.CONV_IN, MemberKind.LINEAR_OUT, MemberKind.LINEAR_IN}
)


class Magnitude(MemberCriterion):
    """Sum of |w|^order over every conv/linear slice of a channel.  A weight's axis-0 and axis-1 sums
    are computed together and kept (with the array they came from) for its other member."""

    kinds = WEIGHT_KINDS
    order: ClassVar[int]

    def __init__(self, aggregate: str = "sum") -> None:
        super().__init__(aggregate)
        self._axis_norms: dict[tuple[str, int], tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = {}

    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray:
        if values.ndim < 2 or member.axis > 1:
            return position_norms(values, member, self.order)
        key = (member.name, member.conv_groups)
        cached = self._axis_norms.get(key)
        if cached is None or cached[0] is not values:
            cached = (values, axis_norms(values, self.order, member.conv_groups))
            self._axis_norms[key] = cached
        return cached[1][member.axis]


class L1(Magnitude):
    """Sum of |w| over every conv/linear slice of the channel (filters and the kernels that read it)."""

    name = "l1"
    order = 1


class L2(Magnitude):
    """Sum of w^2 over the same slices as L1 (the group's squared L2 norm)."""

    name = "l2"
    order = 2


class BNScale(MemberCriterion):
    """|gamma| of the BatchNormalization layers on the channel (Network Slimming).  Groups without BN
    are left whole; a model without any BN is refused with the reason."""

    name = "bn"
    kinds = frozenset({MemberKind.BN_SCALE})

    def prepare(self, inputs: ScoringInputs) -> None:
        if not any(m.kind is MemberKind.BN_SCALE for m in inputs.dep.members.values()):
            raise PlanError(
                "criterion 'bn' reads BatchNormalization gamma, but this model has no BatchNormalization node "
                "(BN was probably folded into the convs at export); use l1 or l2, or export with BN kept."
            )

    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray:
        return np.abs(values.astype(np.float64))


class Random(Criterion):
    """Seeded uniform scores: the baseline every criterion must beat."""

    name = "random"

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray:
        rng = np.random.default_rng([inputs.seed, group.index])
        return rng.random(group.size)
