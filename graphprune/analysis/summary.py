"""What `analyze` reports about a model, as a JSON-ready dict."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from graphprune.analysis.graph import DependencyGraph
from graphprune.model_io import input_image_norm
from graphprune.onnxutil import opset_of


def analysis_summary(
    dep: DependencyGraph,
    name: str,
    macs: int,
    params: int,
    image_input: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Groups, prunable channels, blocked nodes with reasons, grouped convs (and whether their conv
    groups can be removed whole), the model's MACs and params (counted by the caller:
    graphprune.api.model_cost), its image input (channels, height, width, channels_last: the caller's
    graphprune.runtime.shapes.image_shape) and the normalisation it records for it."""
    graph_inputs = dep.model.graph.input
    dynamic = any(not d.HasField("dim_value") for v in graph_inputs for d in v.type.tensor_type.shape.dim[:1])
    groups = []
    for group in dep.groups:
        kinds = Counter(m.kind for m in group.members)
        groups.append(
            {
                "group": group.name,
                "channels": group.size,
                "prunable": int(group.prunable.size),
                "blocks": [b.node for b in group.blocks],
                "members": dict(kinds),
                "blocked_by": sorted(set(group.blocked.values())),
            }
        )
    convs = {
        conv.node: {
            "groups": len(conv.outputs),
            "channels_per_group": [parts[0].size for parts in conv.sides],
            "droppable": conv.node in dep.droppable,
        }
        for conv in dep.grouped_convs
    }
    widths = [width for conv in convs.values() if conv["droppable"] for width in conv["channels_per_group"]]
    return {
        "model": name,
        "opset": opset_of(dep.model),
        "macs": macs,
        "params": params,
        "dynamic_batch": dynamic,
        "image_input": image_input,
        "image_norm": input_image_norm(dep.model),
        "prunable_groups": sum(1 for g in groups if g["prunable"] > 1),
        "prunable_channels": sum(g["prunable"] for g in groups if g["prunable"] > 1),
        "blocked_nodes": dict(sorted(dep.blocked_nodes.items())),
        "grouped_convs": convs,
        # the --round-to at which every droppable grouped conv loses whole conv groups
        "conv_groups_round_to": math.lcm(*widths) if widths else None,
        "groups": groups,
    }
