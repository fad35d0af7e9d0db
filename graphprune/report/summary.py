"""Text for what `analyze` reports (graphprune.analysis.summary makes the JSON-ready dict) and before/after
rows; report receives numbers and computes none."""

from __future__ import annotations

from typing import Any, Protocol

from graphprune.report.tables import fmt_count


class Cost(Protocol):
    """A model's totals (graphprune.runtime.cost.CostReport has them)."""

    macs: int
    params: int


def render_analysis(summary: dict[str, Any], largest: int = 5) -> str:
    lines = [
        f"{summary['model']}  opset {summary['opset']}  {fmt_count(summary['macs'])}MACs  "
        f"{fmt_count(summary['params'])} params  batch: {'dynamic' if summary['dynamic_batch'] else 'static'}",
        f"groups: {summary['prunable_groups']} prunable ({summary['prunable_channels']:,} channels), "
        f"{len(summary['groups']) - summary['prunable_groups']} blocked",
    ]
    image = summary.get("image_input")
    if image is not None:
        layout = "channels-last" if image["channels_last"] else "channels-first"
        norm = summary.get("image_norm")
        how = f"normalised as {norm} (recorded)" if norm else "normalisation not recorded (--image-norm)"
        lines.insert(
            1, f"image input: {image['channels']}x{image['height']}x{image['width']} {layout}, {how}"
        )
    for node, reason in summary["blocked_nodes"].items():
        lines.append(f"  blocked  {node}: {reason}")
    convs = summary["grouped_convs"]
    if convs:
        droppable = sum(conv["droppable"] for conv in convs.values())
        round_to = summary["conv_groups_round_to"]
        how = f" (with --round-to {round_to}, or a latency profile)" if round_to else ""
        lines.append(f"grouped convs: {len(convs)}, {droppable} of them can lose whole conv groups{how}")
    ranked = sorted(summary["groups"], key=lambda g: (-g["channels"] * len(g["blocks"]), g["group"]))
    for group in ranked[:largest]:
        members = ", ".join(f"{count} {kind}" for kind, count in sorted(group["members"].items()))
        lines.append(
            f"  group    {group['group']}: {group['channels']} ch ({group['prunable']} prunable), "
            f"{len(group['blocks'])} producers; {members}"
        )
    return "\n".join(lines) + "\n"


def cost_rows(before: Cost, after: Cost) -> dict[str, dict[str, float]]:
    return {
        "before": {"macs": before.macs, "params": before.params},
        "after": {"macs": after.macs, "params": after.params},
    }
