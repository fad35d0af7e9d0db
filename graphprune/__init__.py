"""graphprune: exact structured channel pruning of ONNX CNN graphs.

The public API (importing it never imports torch):

    from graphprune import prune, PlanOptions
    result = prune("model.onnx", PlanOptions(ratio=0.5), criterion="l1")
    result.save("model-pruned.onnx", "model-pruned.plan.json")
"""

from graphprune.api import (
    PruneResult,
    RecoveryResult,
    analyze_model,
    model_cost,
    prune,
    recover,
    score_channels,
    verify_plan,
)
from graphprune.errors import GraphPruneError
from graphprune.planning import PlanOptions
from graphprune.planning.plan import PruningPlan

__version__ = "0.1.0"


def export(module, example_input, path, **options):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Export a torch module to ONNX keeping BatchNorm (see graphprune.torch_bridge.export.export)."""
    from graphprune.torch_bridge.export import export as _export

    return _export(module, example_input, path, **options)


__all__ = [
    "GraphPruneError",
    "PlanOptions",
    "PruneResult",
    "PruningPlan",
    "RecoveryResult",
    "analyze_model",
    "export",
    "model_cost",
    "prune",
    "recover",
    "score_channels",
    "verify_plan",
]
