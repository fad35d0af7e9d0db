"""Single channel-importance criteria, registered by name (the blend, which composes them with planning
and surgery, registers itself from graphprune.search.blend, which graphprune.api imports)."""

from graphprune.criteria import activation, fpgm, taylor, weight  # noqa: F401  (register the criteria)
from graphprune.criteria.base import Criterion, ScoringInputs, get_criterion

__all__ = ["Criterion", "ScoringInputs", "get_criterion"]
