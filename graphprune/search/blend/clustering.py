"""Layer-wise clustering of criteria by how alike they rank a layer's channels (Spearman correlation).

Criteria whose rankings agree add nothing to each other; each cluster keeps one representative, the
blending candidate.  Clustering is average-linkage agglomerative: the two clusters with the highest
mean pairwise correlation merge while that mean reaches the threshold.  A criterion that is constant
on a layer (no ranking at all, correlation undefined) stays alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.analysis.graph import Group
from graphprune.criteria.normalize import spearman_matrix
from graphprune.search.blend.pool import PoolScores


@dataclass
class LayerClusters:
    """One group's criteria, their Spearman matrix, clusters (names, pool order) and representatives."""

    group: int
    name: str
    criteria: list[str]
    similarity: np.ndarray
    clusters: list[list[str]]
    representatives: list[str]

    def cluster_of(self, criterion: str) -> int | None:
        """Index of the cluster holding `criterion`, or None if it has no opinion on this layer."""
        return next((i for i, members in enumerate(self.clusters) if criterion in members), None)

    def as_dict(self) -> dict[str, object]:
        return {
            "group": self.group,
            "name": self.name,
            "criteria": self.criteria,
            "spearman": json_matrix(self.similarity),
            "clusters": self.clusters,
            "representatives": self.representatives,
        }


def cluster_indices(similarity: np.ndarray, threshold: float) -> list[list[int]]:
    """Average-linkage agglomerative clusters of a similarity matrix (NaN never merges), each sorted,
    ordered by their first member; ties go to the earliest pair."""
    clusters = [[i] for i in range(len(similarity))]
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                block = similarity[np.ix_(clusters[a], clusters[b])]
                linkage = -np.inf if np.isnan(block).any() else float(block.mean())
                if linkage > best:
                    best, pair = linkage, (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters, key=lambda members: members[0])


def representative(similarity: np.ndarray, members: list[int]) -> int:
    """The member most similar on average to the rest of its cluster (the earliest on ties)."""
    if len(members) == 1:
        return members[0]
    block = np.nan_to_num(similarity[np.ix_(members, members)], nan=-1.0)
    mean = (block.sum(axis=1) - np.diag(block)) / (len(members) - 1)
    return members[int(np.argmax(mean))]


def cluster_layer(group: Group, pool: PoolScores, threshold: float) -> LayerClusters | None:
    """Cluster the criteria that score `group` (None if none does)."""
    names = [name for name in pool.names if group.index in pool.scores[name]]
    if not names:
        return None
    similarity = spearman_matrix(np.vstack([pool.scores[name][group.index] for name in names]))
    groups = cluster_indices(similarity, threshold)
    return LayerClusters(
        group.index,
        group.name,
        names,
        similarity,
        [[names[i] for i in members] for members in groups],
        [names[representative(similarity, members)] for members in groups],
    )


def cluster_layers(pool: PoolScores, groups: list[Group], threshold: float) -> list[LayerClusters]:
    """Clusters for every group some pool criterion scores."""
    return [layer for group in groups if (layer := cluster_layer(group, pool, threshold)) is not None]


def mean_similarity(layers: list[LayerClusters], names: list[str]) -> np.ndarray:
    """Spearman correlation between `names`, averaged over the layers where both criteria have a ranking
    (NaN where they never do)."""
    index = {name: i for i, name in enumerate(names)}
    total = np.zeros((len(names), len(names)))
    count = np.zeros_like(total)
    for layer in layers:
        rows = [index[name] for name in layer.criteria]
        known = ~np.isnan(layer.similarity)
        total[np.ix_(rows, rows)] += np.where(known, layer.similarity, 0.0)
        count[np.ix_(rows, rows)] += known
    with np.errstate(invalid="ignore"):
        return total / count


def json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    """Rows of a correlation matrix for JSON: rounded, undefined entries as null."""
    return [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in matrix]
