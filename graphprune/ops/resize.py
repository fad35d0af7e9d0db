"""Spatial resizing (Resize, Upsample): channels pass; a `sizes` input naming the channel count is rewritten."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from graphprune.onnxutil import attribute
from graphprune.ops.atoms import view_axes
from graphprune.ops.common import input_at
from graphprune.ops.context import Rewrite, RuleContext, Sizes
from graphprune.ops.edits import set_size_entries
from graphprune.ops.spec import output_elements, register


@dataclass(frozen=True)
class ResizeSizes(Rewrite):
    """The `sizes` input's channel entries become the pruned counts."""

    output: str

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        old, new = sizes.shape(self.output), sizes.pruned_shape(self.output)
        axes = [int(a) % len(old) for a in node.attrs.get("axes", range(len(old)))]
        changes = {axes.index(a): new[a] for a in range(len(old)) if old[a] != new[a] and a in axes}
        set_size_entries(sizes, node, 3, changes)


def resize(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Spatial resizing keeps channels; a `sizes` input naming the channel count is rewritten."""
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    axes = [a % rank for a in attribute(node, "axes", range(rank))]
    channel_axes = set(view_axes(view))
    scales_name = input_at(node, 2) if node.op_type == "Resize" else input_at(node, 1)
    scales = ctx.value(scales_name)
    if (
        scales is not None
        and scales.size
        and any(scales[i] != 1 for i, a in enumerate(axes) if a in channel_axes)
    ):
        ctx.opaque(node, "the channel axis is resized")
        return
    sizes_name = input_at(node, 3) if node.op_type == "Resize" else ""
    if sizes_name and channel_axes & set(axes):
        ctx.rewrite(ResizeSizes(node.name, node.output[0]))
    ctx.set_view(node.output[0], view)


register("Resize", rule=resize, macs=output_elements, size_inputs=(2, 3))
register("Upsample", rule=resize, macs=output_elements)
