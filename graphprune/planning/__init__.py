"""From scores to a removal: PlanOptions say how much and under which limits, the Planner chooses the
channels, and a PruningPlan records them (JSON) as the input of surgery."""

from graphprune.planning.plan import PruningPlan
from graphprune.planning.planner import Planner, PlanOptions, RemovalPlanner, predicted_macs

__all__ = ["PlanOptions", "Planner", "PruningPlan", "RemovalPlanner", "predicted_macs"]
