"""Channel importance criteria (registered by name)."""

from graphprune.criteria import weight  # noqa: F401  (registers the weight criteria)
from graphprune.criteria.base import Criterion, ScoringInputs, get_criterion

__all__ = ["Criterion", "ScoringInputs", "get_criterion"]
