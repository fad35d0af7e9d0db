"""What `analyze` reports about a model, as a JSON-ready dict and as text."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from graphprune.analysis.graph import DependencyGraph
from graphprune.onnxutil import opset_of
from graphprune.report.tables import fmt_count
from graphprune.runtime.cost import CostReport, count_cost


def analysis_summary(dep: DependencyGraph, name: str) -> dict[str, Any]:
    """Groups, prunable channels, blocked nodes with reasons, MACs and params."""
    cost = count_cost(dep.model, dep.shapes)
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
    return {
        "model": name,
        "opset": opset_of(dep.model),
        "macs": cost.macs,
        "params": cost.params,
        "dynamic_batch": dynamic,
        "prunable_groups": sum(1 for g in groups if g["prunable"] > 1),
        "prunable_channels": sum(g["prunable"] for g in groups if g["prunable"] > 1),
        "blocked_nodes": dict(sorted(dep.blocked_nodes.items())),
        "groups": groups,
    }


def render_analysis(summary: dict[str, Any], largest: int = 5) -> str:
    lines = [
        f"{summary['model']}  opset {summary['opset']}  {fmt_count(summary['macs'])}MACs  "
        f"{fmt_count(summary['params'])} params  batch: {'dynamic' if summary['dynamic_batch'] else 'static'}",
        f"groups: {summary['prunable_groups']} prunable ({summary['prunable_channels']:,} channels), "
        f"{len(summary['groups']) - summary['prunable_groups']} blocked",
    ]
    for node, reason in summary["blocked_nodes"].items():
        lines.append(f"  blocked  {node}: {reason}")
    ranked = sorted(summary["groups"], key=lambda g: (-g["channels"] * len(g["blocks"]), g["group"]))
    for group in ranked[:largest]:
        members = ", ".join(f"{count} {kind}" for kind, count in sorted(group["members"].items()))
        lines.append(
            f"  group    {group['group']}: {group['channels']} ch ({group['prunable']} prunable), "
            f"{len(group['blocks'])} producers; {members}"
        )
    return "\n".join(lines) + "\n"


def cost_rows(before: CostReport, after: CostReport) -> dict[str, dict[str, float]]:
    return {
        "before": {"macs": before.macs, "params": before.params},
        "after": {"macs": after.macs, "params": after.params},
    }


def conv_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv, by node name (names survive pruning)."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    return {
        n.name: dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dims
    }
