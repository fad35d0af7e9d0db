"""Channel importance criteria (registered by name)."""

from graphprune.criteria import activation, blend, fpgm, taylor, weight  # noqa: F401  (register the criteria)
from graphprune.criteria.base import Criterion, ScoringInputs, get_criterion

__all__ = ["Criterion", "ScoringInputs", "get_criterion"]
