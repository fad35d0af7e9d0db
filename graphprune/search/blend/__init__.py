"""Blending Pruning Criteria (METHODS.md section 3): pool, layer-wise clustering, calibrated blend and an
evolutionary search over the calibration factors judged by held-out accuracy."""

from graphprune.search.blend.clustering import LayerClusters, cluster_indices, cluster_layers
from graphprune.search.blend.criterion import Blend, BlendConfig, write_report
from graphprune.search.blend.pool import DEFAULT_POOL, PoolScores, score_pool
from graphprune.search.blend.search import SearchConfig, SearchResult, evolve

__all__ = [
    "DEFAULT_POOL",
    "Blend",
    "BlendConfig",
    "LayerClusters",
    "PoolScores",
    "SearchConfig",
    "SearchResult",
    "cluster_indices",
    "cluster_layers",
    "evolve",
    "score_pool",
    "write_report",
]
