"""Weight criteria: L1 and L2 magnitude, BN |gamma| (Network Slimming), and a seeded random baseline."""

from __future__ import annotations

import numpy as np

from graphprune.analysis.graph import Group
from graphprune.criteria.base import Criterion, MemberCriterion, ScoringInputs, position_norms
from graphprune.errors import PlanError
from graphprune.ops.context import MemberKind, ParamMember

WEIGHT_KINDS = frozenset(
    {MemberKind.CONV_OUT, MemberKind.CONV_IN, MemberKind.LINEAR_OUT, MemberKind.LINEAR_IN}
)


class L1(MemberCriterion):
    """Sum of |w| over every conv/linear slice of the channel (filters and the kernels that read it)."""

    name = "l1"
    kinds = WEIGHT_KINDS

    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray:
        return position_norms(values, member, 1)


class L2(MemberCriterion):
    """Sum of w^2 over the same slices as L1 (the group's squared L2 norm)."""

    name = "l2"
    kinds = WEIGHT_KINDS

    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray:
        return position_norms(values, member, 2)


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
