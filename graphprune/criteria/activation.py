"""Activation criteria: channel importance from feature maps on calibration data (runtime.activations).

mean_act: mean |a| (bigger responses matter more).  apoz: 1 - APoZ (Hu et al. 2016: a channel that is
mostly zero after its activation matters less).  act_var: variance of the activation (a near-constant
channel is a bias in disguise).  entropy: entropy of the per-image mean response (Luo & Wu 2017: a
channel that says the same for every image carries little information).  hrank: average rank of the
feature map (Lin et al., CVPR 2020).  Each group's score sums (by `aggregate`) the statistics of its
producers' feature maps.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.criteria.base import Criterion, ScoringInputs, class_row, combine_rows
from graphprune.criteria.tensors import position_atoms
from graphprune.errors import CalibrationError


class ActivationCriterion(Criterion):
    """Scores from one streamed activation statistic, mapped from tensor positions to group classes."""

    statistic: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.statistics = frozenset({cls.statistic})

    def prepare(self, inputs: ScoringInputs) -> None:
        stats = inputs.activations
        if stats is None or self.statistic not in stats.statistics:
            raise CalibrationError(
                f"criterion {self.name!r} reads activations; give calibration data (--calib DATA, or "
                "calib= in the Python API)."
            )

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Statistic -> importance (higher = keep)."""
        return values

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None:
        stats = inputs.activations
        tensors = stats.group_tensors(group)
        values = {t: self.transform(stats.tensors[t].value(self.statistic)) for t in tensors}
        return tensor_scores(inputs.dep, group, tensors, values, self.aggregate)


def tensor_scores(
    dep: DependencyGraph, group: Group, tensors: list[str], values: dict[str, np.ndarray], aggregate: str
) -> np.ndarray | None:
    """Per-position values of judged tensors, mapped onto the group's classes and aggregated."""
    rows = [class_row(dep, group, position_atoms(dep, tensor), values[tensor]) for tensor in tensors]
    return combine_rows(rows, aggregate)


class MeanActivation(ActivationCriterion):
    """Mean |activation| of the channel's feature maps."""

    name = "mean_act"
    statistic = "mean_abs"


class APoZ(ActivationCriterion):
    """1 - average percentage of zeros: mostly-zero channels are the least important."""

    name = "apoz"
    statistic = "apoz"

    def transform(self, values: np.ndarray) -> np.ndarray:
        return 1.0 - values


class ActivationVariance(ActivationCriterion):
    """Variance of the channel's activation over images and positions."""

    name = "act_var"
    statistic = "variance"


class Entropy(ActivationCriterion):
    """Entropy (bits) of the channel's per-image mean activation."""

    name = "entropy"
    statistic = "entropy"


class HRank(ActivationCriterion):
    """Average rank of the channel's feature map over the calibration images."""

    name = "hrank"
    statistic = "hrank"
