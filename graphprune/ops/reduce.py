"""Reductions and softmax: fine over space, blocking across the channel axis."""

from __future__ import annotations

import numpy as np
import onnx

from graphprune.onnxutil import attribute
from graphprune.ops.atoms import view_axes
from graphprune.ops.common import int_list
from graphprune.ops.context import RuleContext
from graphprune.ops.spec import op

REDUCE_OPS = "ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceLogSumExp ReduceProd ReduceSumSquare".split()


@op(*REDUCE_OPS)
def reduce(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Reductions over space keep channels; a reduction across channels mixes them and blocks."""
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    axes = int_list(ctx, node, 1, "axes")
    if not axes:
        axes = [] if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    axes = sorted(a % rank for a in axes)
    if set(axes) & set(view_axes(view)):
        ctx.opaque(node, "the reduction runs across the channel axis")
        return
    ctx.set_view(
        node.output[0], view if attribute(node, "keepdims", 1) else np.squeeze(view, axis=tuple(axes))
    )


@op("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext, node: onnx.NodeProto) -> None:
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    if ctx.opset >= 13:
        mixed = {attribute(node, "axis", -1) % rank}
    else:
        mixed = set(range(attribute(node, "axis", 1) % rank, rank))
    if mixed & set(view_axes(view)):
        ctx.opaque(node, "softmax normalises across the channel axis")
        return
    ctx.set_view(node.output[0], view)
