"""Normalisation: per channel (BatchNormalization, InstanceNormalization) and per group of channels
(GroupNormalization, and InstanceNormalization over [N, G, C/G*H*W] as torch exports GroupNorm), where a
group of channels goes or stays as one and the group count follows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.onnxutil import attribute
from graphprune.ops.atoms import view_axes
from graphprune.ops.context import MemberKind, Rewrite, Role, RuleContext, Sizes
from graphprune.ops.spec import Macs, NodeShapes, register


def _normalisation_macs(node: NodeShapes) -> Macs:
    """2 * in_elems (affine normalisation)."""
    return Macs(per_output=2 * math.prod(node.in_shape(0)))


def channel_norm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Per-channel normalisation: every parameter input follows the channels.  Over a view whose axis-1
    positions each hold one class spread over further axes (groups of channels flattened with space,
    see layout.reshape), a position is a group: the parameters follow the groups."""
    x = node.input[0]
    view = ctx.view(x)
    grouped = view is not None and len(view_axes(view)) > 1
    atoms = _group_atoms(ctx, x) if grouped else None
    if atoms is None:
        atoms = ctx.axis_atoms(x, 1, node)
    if atoms is None:
        return
    kinds = (MemberKind.BN_SCALE, MemberKind.BN_BIAS, MemberKind.BN_MEAN, MemberKind.BN_VAR)
    for name, kind in zip(node.input[1:], kinds, strict=False):
        if name and ctx.const(name) is not None:
            ctx.member(node, name, 0, atoms, Role.PRODUCER, kind)
        elif name:
            ctx.opaque(node, f"parameter {name} is not an initializer")
            return
    ctx.set_view(node.output[0], ctx.view(x))


def _group_atoms(ctx: RuleContext, x: str) -> np.ndarray | None:
    """One atom per axis-1 position when each position's atoms (over the other axes) are one class."""
    view = ctx.view(x)
    if view.shape[1] != ctx.shape(x)[1]:
        return None
    rows = np.moveaxis(view, 1, 0).reshape(view.shape[1], -1)
    roots = np.vectorize(ctx.table.find)(rows)
    return rows[:, 0] if np.all(roots == roots[:, :1]) else None


@dataclass(frozen=True)
class GroupCount(Rewrite):
    """GroupNormalization's `num_groups` is the pruned channel count over the (unchanged) group size."""

    input: str
    group_size: int

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        node.attrs["num_groups"] = sizes.pruned_shape(self.input)[1] // self.group_size


def group_norm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """GroupNormalization: the channels of one group are tied into one class (a group goes or stays
    whole, so the others are normalised exactly as before); scale and bias follow the channels (opset
    21, [C]) or the groups (opset 18, [G]); num_groups is recomputed."""
    x = node.input[0]
    atoms = ctx.axis_atoms(x, 1, node)
    groups = attribute(node, "num_groups")
    if atoms is None:
        return
    if not groups or atoms.size % groups:
        ctx.block(atoms, node, "num_groups does not divide the channels")
        return
    rows = atoms.reshape(groups, -1)
    for row in rows:
        ctx.merge(row[:1], row, node)
    for name, kind in zip(node.input[1:3], (MemberKind.BN_SCALE, MemberKind.BN_BIAS), strict=False):
        value = ctx.const(name)
        if value is None or value.ndim != 1 or value.size not in (atoms.size, groups):
            ctx.opaque(node, f"parameter {name} is not a per-channel or per-group initializer")
            return
        ctx.member(node, name, 0, atoms if value.size == atoms.size else rows[:, 0], Role.PRODUCER, kind)
    ctx.rewrite(GroupCount(node.name, x, rows.shape[1]))
    ctx.set_view(node.output[0], ctx.view(x))


# Running mean and variance are framework buffers, not parameters.
register(
    "BatchNormalization",
    rule=channel_norm,
    macs=_normalisation_macs,
    buffer_inputs=frozenset({3, 4}),
    judged_through=True,
)
register("InstanceNormalization", rule=channel_norm, macs=_normalisation_macs, judged_through=True)
register("GroupNormalization", rule=group_norm, macs=_normalisation_macs, judged_through=True)
