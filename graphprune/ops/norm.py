"""Per-channel normalisation (BatchNormalization, InstanceNormalization); GroupNormalization is only
counted (its channels are normalised together, so it blocks them)."""

from __future__ import annotations

import math

import onnx

from graphprune.ops.context import MemberKind, Role, RuleContext
from graphprune.ops.spec import Macs, NodeShapes, register


def _normalisation_macs(node: NodeShapes) -> Macs:
    """2 * in_elems (affine normalisation)."""
    return Macs(per_output=2 * math.prod(node.in_shape(0)))


def channel_norm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Per-channel normalisation: every parameter input follows the channels."""
    x = node.input[0]
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


# Running mean and variance are framework buffers, not parameters.
register(
    "BatchNormalization",
    rule=channel_norm,
    macs=_normalisation_macs,
    buffer_inputs=frozenset({3, 4}),
    judged_through=True,
)
register("InstanceNormalization", rule=channel_norm, macs=_normalisation_macs, judged_through=True)
register("GroupNormalization", macs=_normalisation_macs)
