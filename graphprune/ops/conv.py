"""Conv (plain, grouped, depthwise) and ConvTranspose: the producers and consumers of channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.onnxutil import attribute
from graphprune.ops.common import input_at
from graphprune.ops.context import MemberKind, Rewrite, Role, RuleContext, Sizes
from graphprune.ops.spec import Macs, NodeShapes, bias_macs, op


@dataclass(frozen=True)
class DepthwiseGroups(Rewrite):
    """A depthwise conv's `group` is its (pruned) input channel count."""

    input: str

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        node.attrs["group"] = sizes.pruned_shape(self.input)[1]


@dataclass(frozen=True)
class GroupCount(Rewrite):
    """A grouped conv's `group` is the number of its conv groups that keep input channels (whole conv
    groups are removed where analysis allows it)."""

    input: str
    groups: int

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        kept = sizes.kept(self.input, 1)
        node.attrs["group"] = sum(bool(part.any()) for part in np.split(kept, self.groups))


def _conv_macs(node: NodeShapes) -> Macs:
    """out_elems * (Cin / groups) * prod(kernel), plus a bias; a depthwise conv mixes no channels."""
    weight = node.in_shape(1)  # [Cout, Cin / groups, *kernel]
    main = math.prod(node.out_shape()) * math.prod(weight[1:])
    depthwise = node.attr("group", 1) > 1 and node.attr("group", 1) == node.in_shape(0)[1]
    bias = bias_macs(node)
    return Macs(per_output=main + bias) if depthwise else Macs(mixing=main, per_output=bias)


def _conv_transpose_macs(node: NodeShapes) -> Macs:
    """in_elems * (Cout / groups) * prod(kernel), plus a bias (the true count; ptflops multiplies by
    output positions, which overstates strided transposed convs)."""
    weight = node.in_shape(1)  # [Cin, Cout / groups, *kernel]
    return Macs(mixing=math.prod(node.in_shape(0)) * math.prod(weight[1:]), per_output=bias_macs(node))


@op("Conv", macs=_conv_macs)
def conv(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Plain conv: reads input channels, creates output channels.  Depthwise: output channels are the
    input channels (times the multiplier).  Grouped: equal removal per group on both sides, or whole
    conv groups where analysis finds that safe."""
    x, w_name, bias = node.input[0], node.input[1], input_at(node, 2)
    weight = ctx.const(w_name)
    if weight is None:
        ctx.opaque(node, "the weights are computed at run time, not an initializer")
        return
    groups = attribute(node, "group", 1)
    cin, cout = ctx.shape(x)[1], weight.shape[0]
    in_atoms = ctx.axis_atoms(x, 1, node)
    y = node.output[0]
    if groups > 1 and groups == cin and cout % cin == 0:
        if in_atoms is None:
            in_atoms = ctx.blocked_source(node, cin, "depthwise conv over channels without a mapping")
        out_atoms = np.repeat(in_atoms, cout // cin)
        ctx.rewrite(DepthwiseGroups(node.name, x))
    else:
        if in_atoms is not None:
            ctx.member(node, w_name, 1, in_atoms, Role.CONSUMER, MemberKind.CONV_IN, conv_groups=groups)
        out_atoms = ctx.new_source(node, cout, w_name)
        if groups > 1:
            ctx.grouped_conv(node, in_atoms, out_atoms, groups)
            if in_atoms is not None:
                ctx.rewrite(GroupCount(node.name, x, groups))
    ctx.member(node, w_name, 0, out_atoms, Role.PRODUCER, MemberKind.CONV_OUT)
    if bias:
        ctx.member(node, bias, 0, out_atoms, Role.PRODUCER, MemberKind.BIAS)
    ctx.set_view(y, ctx.channel_view(out_atoms, y, 1))


@op("ConvTranspose", macs=_conv_transpose_macs)
def conv_transpose(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Transposed conv (group 1): weight [Cin, Cout, k...] reads axis 0, produces axis 1."""
    x, w_name, bias = node.input[0], node.input[1], input_at(node, 2)
    weight = ctx.const(w_name)
    if weight is None or attribute(node, "group", 1) != 1:
        ctx.opaque(node, "grouped or computed-weight ConvTranspose is not pruned")
        return
    in_atoms = ctx.axis_atoms(x, 1, node)
    if in_atoms is not None:
        ctx.member(node, w_name, 0, in_atoms, Role.CONSUMER, MemberKind.CONV_IN)
    out_atoms = ctx.new_source(node, weight.shape[1], w_name)
    ctx.member(node, w_name, 1, out_atoms, Role.PRODUCER, MemberKind.CONV_OUT)
    if bias:
        ctx.member(node, bias, 0, out_atoms, Role.PRODUCER, MemberKind.BIAS)
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], 1))
