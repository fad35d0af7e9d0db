"""FPGM (He et al., CVPR 2019): filters near the geometric median of their layer are redundant.

As in the reference implementation, closeness to the geometric median is measured by the sum of
Euclidean distances from a filter to every other filter of the same weight: the filter minimising it is
the median's best approximation among the filters.  The score is that sum, so redundant filters score
low.  Only producer weights (conv / linear outputs) are read; a group with several producers sums them.
"""

from __future__ import annotations

import numpy as np

from graphprune.criteria.base import MemberCriterion
from graphprune.ops.context import MemberKind, ParamMember


def distance_sums(filters: np.ndarray) -> np.ndarray:
    """For each row of a [C, K] array, the sum of its Euclidean distances to every row."""
    rows = filters.astype(np.float64)
    squared = (rows**2).sum(axis=1)
    gram = rows @ rows.T
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances.sum(axis=1)


class FPGM(MemberCriterion):
    """Sum of distances from each filter to the other filters of its layer (per producer weight)."""

    name = "fpgm"
    kinds = frozenset({MemberKind.CONV_OUT, MemberKind.LINEAR_OUT})

    def position_scores(self, values: np.ndarray, member: ParamMember) -> np.ndarray:
        filters = np.moveaxis(values, member.axis, 0)
        return distance_sums(filters.reshape(filters.shape[0], -1))
