"""Score normalisations that make one group's channel scores comparable with another's (global ranking,
blending), and the rank helpers the blend's Spearman similarity is built on.

mean / max / sum divide by that statistic of the group; rank maps scores to average ranks in (0, 1]
(ties share one rank); lamp is LAMP (Lee et al., ICLR 2021): each score divided by the sum of every
score of the group at least as large, so a group's largest channel always gets 1.
"""

from __future__ import annotations

import numpy as np

from graphprune.errors import PlanError

NORMALIZATIONS = ("mean", "max", "sum", "none", "rank", "lamp")


def rank_values(scores: np.ndarray) -> np.ndarray:
    """Average ranks 1..n of `scores` (ties share the mean of their positions), as float64."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def lamp(scores: np.ndarray) -> np.ndarray:
    """LAMP: s_i / sum of s_j over every j with s_j >= s_i (equal scores get equal values; 0 / 0 is 0)."""
    values = np.asarray(scores, dtype=np.float64)
    ordered = np.sort(values)
    below = np.r_[0.0, np.cumsum(ordered)]
    denominators = below[-1] - below[np.searchsorted(ordered, values, side="left")]
    return np.divide(values, denominators, out=np.zeros_like(values), where=denominators != 0)


def normalize(scores: np.ndarray, how: str) -> np.ndarray:
    """One group's scores normalised by `how` (one of NORMALIZATIONS); a zero scale leaves them as they are."""
    values = np.asarray(scores, dtype=np.float64)
    if how == "rank":
        return rank_values(values) / max(values.size, 1)
    if how == "lamp":
        return lamp(values)
    scalers = {"mean": np.mean, "max": np.max, "sum": np.sum, "none": lambda s: 1.0}
    if how not in scalers:
        raise PlanError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALIZATIONS)}.")
    scale = scalers[how](values) if values.size else 1.0
    return values / scale if scale else values


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (NaN when either is constant)."""
    return float(spearman_matrix(np.vstack([a, b]))[0, 1])


def spearman_matrix(rows: np.ndarray) -> np.ndarray:
    """Pairwise Spearman correlation between the rows of a [K, n] array: the Pearson correlation of their
    average ranks; a constant row correlates NaN with every row, itself included."""
    ranks = np.vstack([rank_values(row) for row in np.atleast_2d(rows)])
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = (centred @ centred.T) / np.outer(norms, norms)
    return np.clip(matrix, -1.0, 1.0)
