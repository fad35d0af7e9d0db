"""Per-channel ops (activations, pooling) and broadcasting ops (residual sums, SE scaling)."""

from __future__ import annotations

import numpy as np
import onnx

from graphprune.ops.atoms import view_axes
from graphprune.ops.context import MemberKind, Role, RuleContext
from graphprune.ops.spec import MacFormula, input_elements, output_elements, register

UNARY_OPS = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign Mish Erf Abs Neg "
    "Exp Log Sqrt Reciprocal Identity Dropout Cast Floor Ceil Round Sign ThresholdedRelu Swish Not "
    "IsNaN IsInf Sin Cos"
).split()
ELEMENTWISE_OPS = "Add Sub Mul Div Pow Max Min Sum Mean Where Clip PRelu Equal Greater Less And Or".split()
POOL_OPS = "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
# Torch-Pruning counts activations per output element, pooling per input element, the rest as free.
COUNTED_ACTIVATIONS = frozenset("Relu PRelu LeakyRelu Elu Gelu Clip".split())
COUNTED_POOLS = frozenset("MaxPool AveragePool GlobalAveragePool GlobalMaxPool".split())
# A producer's feature map is followed through these to the map the next layer reads.
JUDGED_THROUGH = frozenset(
    "Relu LeakyRelu PRelu Clip Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Mish Swish "
    "Identity Dropout Add Sum Mul".split()
)
NONNEGATIVE = frozenset("Relu Sigmoid HardSigmoid Softplus Abs".split())


def passthrough(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Per-channel ops: output channel i is a function of input channel i only."""
    for out in node.output:  # Dropout's mask has the data's shape, MaxPool's indices too
        ctx.set_view(out, ctx.view(node.input[0]))
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        ctx.block(ctx.view(node.input[0]), node, "MaxPool indices encode channel offsets")


def elementwise(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Broadcasting ops: operands that meet channel-for-channel are tied (residual sums, SE scaling);
    constants with a channel axis follow it; an opaque operand as wide as the channels blocks them."""
    out = node.output[0]
    rank = len(ctx.shape(out))
    viewed, opaque_shapes, constants = [], [], []
    for name in filter(None, node.input):
        shape = (1,) * (rank - len(ctx.shape(name))) + ctx.shape(name)
        if ctx.const(name) is not None:
            constants.append((name, shape))
        elif ctx.view(name) is not None:
            view = ctx.view(name)
            viewed.append((shape, view.reshape((1,) * (rank - view.ndim) + view.shape)))
        else:
            opaque_shapes.append(shape)
    axes = {axis for _, view in viewed for axis in view_axes(view)}
    if not axes:
        ctx.set_view(out, viewed[0][1] if viewed else None)
        return
    if len(axes) > 1:
        ctx.opaque(node, "operands carry channels on different axes")
        return
    (axis,) = axes
    reference = next(view for _, view in viewed if view.shape[axis] > 1)
    for shape, view in viewed:
        if shape[axis] > 1 and view is not reference:
            ctx.merge(reference, view, node)
    if any(shape[axis] > 1 for shape in opaque_shapes):
        ctx.block(reference, node, "an operand without a channel mapping is as wide as the channels")
    for name, shape in constants:
        if shape[axis] > 1:
            const_axis = axis - (rank - len(ctx.shape(name)))
            ctx.member(node, name, const_axis, reference.ravel(), Role.PRODUCER, MemberKind.ELEMENTWISE)
    ctx.set_view(out, reference)


def _fold_identity(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> np.ndarray:
    return inputs[0]


def _macs(op_type: str) -> MacFormula | None:
    if op_type in COUNTED_ACTIVATIONS:
        return output_elements
    return input_elements if op_type in COUNTED_POOLS else None


for _op in (*UNARY_OPS, *POOL_OPS):
    register(
        _op,
        rule=passthrough,
        macs=_macs(_op),
        judged_through=_op in JUDGED_THROUGH,
        nonnegative=_op in NONNEGATIVE,
        fold=_fold_identity if _op == "Identity" else None,
    )
for _op in ELEMENTWISE_OPS:
    register(_op, rule=elementwise, macs=_macs(_op), judged_through=_op in JUDGED_THROUGH)
