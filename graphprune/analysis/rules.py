"""How channels flow through each ONNX op: one small rule per op type, kept in a registry.

A rule reads its inputs' views and either passes them on, creates new channels, ties channels that
must go together, records the initializer slices that follow them, or blocks them.  An op with no rule
blocks every channel that reaches it: nothing is ever pruned through an op the tool does not understand.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from graphprune.analysis.atoms import compress, view_axes
from graphprune.analysis.context import Role, RuleContext
from graphprune.onnxutil import attribute

Rule = Callable[[RuleContext, onnx.NodeProto], None]
RULES: dict[str, Rule] = {}

UNARY_OPS = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign Mish Erf Abs Neg "
    "Exp Log Sqrt Reciprocal Identity Dropout Cast Floor Ceil Round Sign ThresholdedRelu Swish Not "
    "IsNaN IsInf Sin Cos"
).split()
ELEMENTWISE_OPS = "Add Sub Mul Div Pow Max Min Sum Mean Where Clip PRelu Equal Greater Less And Or".split()
POOL_OPS = "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
REDUCE_OPS = "ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceLogSumExp ReduceProd ReduceSumSquare".split()


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = function
        return function

    return register


def input_at(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def int_list(ctx: RuleContext, node: onnx.NodeProto, input_index: int, attr_name: str) -> list[int] | None:
    """An integer list given either as a constant input (newer opsets) or as an attribute (older ones)."""
    name = input_at(node, input_index)
    if name:
        value = ctx.value(name)
        return None if value is None else [int(v) for v in np.asarray(value).ravel()]
    value = attribute(node, attr_name)
    return None if value is None else [int(v) for v in value]


@rule(*UNARY_OPS, *POOL_OPS)
def passthrough(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Per-channel ops: output channel i is a function of input channel i only."""
    ctx.set_view(node.output[0], ctx.view(node.input[0]))
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        ctx.block(ctx.view(node.input[0]), node, "MaxPool indices encode channel offsets")


@rule(*ELEMENTWISE_OPS)
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
            ctx.member(node, name, const_axis, reference.ravel(), Role.PRODUCER, "elementwise")
    ctx.set_view(out, reference)


@rule("Conv")
def conv(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Plain conv: reads input channels, creates output channels.  Depthwise: output channels are the
    input channels (times the multiplier).  Grouped: equal removal per group on both sides."""
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
        ctx.rewrite(node, "depthwise", input=x)
    else:
        if in_atoms is not None:
            ctx.member(node, w_name, 1, in_atoms, Role.CONSUMER, "conv_in", conv_groups=groups)
            if groups > 1:
                ctx.equal_segments(node, in_atoms, groups)
        out_atoms = ctx.new_source(node, cout, w_name)
        if groups > 1:
            ctx.equal_segments(node, out_atoms, groups)
    ctx.member(node, w_name, 0, out_atoms, Role.PRODUCER, "conv_out")
    if bias:
        ctx.member(node, bias, 0, out_atoms, Role.PRODUCER, "bias")
    ctx.set_view(y, ctx.channel_view(out_atoms, y, 1))


@rule("ConvTranspose")
def conv_transpose(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Transposed conv (group 1): weight [Cin, Cout, k...] reads axis 0, produces axis 1."""
    x, w_name, bias = node.input[0], node.input[1], input_at(node, 2)
    weight = ctx.const(w_name)
    if weight is None or attribute(node, "group", 1) != 1:
        ctx.opaque(node, "grouped or computed-weight ConvTranspose is not pruned")
        return
    in_atoms = ctx.axis_atoms(x, 1, node)
    if in_atoms is not None:
        ctx.member(node, w_name, 0, in_atoms, Role.CONSUMER, "conv_in")
    out_atoms = ctx.new_source(node, weight.shape[1], w_name)
    ctx.member(node, w_name, 1, out_atoms, Role.PRODUCER, "conv_out")
    if bias:
        ctx.member(node, bias, 0, out_atoms, Role.PRODUCER, "bias")
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], 1))


@rule("BatchNormalization", "InstanceNormalization")
def channel_norm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Per-channel normalisation: every parameter input follows the channels."""
    x = node.input[0]
    atoms = ctx.axis_atoms(x, 1, node)
    if atoms is None:
        return
    kinds = ("bn_scale", "bn_bias", "bn_mean", "bn_var")
    for name, kind in zip(node.input[1:], kinds, strict=False):
        if name and ctx.const(name) is not None:
            ctx.member(node, name, 0, atoms, Role.PRODUCER, kind)
        elif name:
            ctx.opaque(node, f"parameter {name} is not an initializer")
            return
    ctx.set_view(node.output[0], ctx.view(x))


@rule("Gemm")
def gemm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Fully connected layer: input features are consumed, hidden units are new prunable channels."""
    a, b_name, c_name = node.input[0], node.input[1], input_at(node, 2)
    weight = ctx.const(b_name)
    trans_b = attribute(node, "transB", 0)
    if weight is None or attribute(node, "transA", 0):
        ctx.opaque(node, "Gemm with transA or computed weights is not pruned")
        return
    in_atoms = ctx.axis_atoms(a, 1, node)
    if in_atoms is not None:
        ctx.member(node, b_name, 1 if trans_b else 0, in_atoms, Role.CONSUMER, "linear_in")
    hidden = weight.shape[0] if trans_b else weight.shape[1]
    out_atoms = ctx.new_source(node, hidden, b_name)
    ctx.member(node, b_name, 0 if trans_b else 1, out_atoms, Role.PRODUCER, "linear_out")
    bias = ctx.const(c_name)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == hidden and hidden > 1:
        ctx.member(node, c_name, bias.ndim - 1, out_atoms, Role.PRODUCER, "bias")
    elif c_name and bias is None:
        ctx.block(out_atoms, node, "the bias is computed at run time")
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], 1))


@rule("MatMul")
def matmul(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Activation times a constant 2-D matrix: the last axis is consumed, and its columns are new units."""
    a, b_name = node.input[0], node.input[1]
    weight = ctx.const(b_name)
    if weight is None or weight.ndim != 2 or ctx.const(a) is not None:
        ctx.opaque(node, "MatMul between two activations (or with a batched constant) is not pruned")
        return
    in_atoms = ctx.axis_atoms(a, -1, node)
    if in_atoms is not None:
        ctx.member(node, b_name, 0, in_atoms, Role.CONSUMER, "linear_in")
    out_atoms = ctx.new_source(node, weight.shape[1], b_name)
    ctx.member(node, b_name, 1, out_atoms, Role.PRODUCER, "linear_out")
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], -1))


@rule("Concat")
def concat(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Concatenation on the channel axis lays the inputs' channels side by side (channel offsets);
    on another axis it ties the inputs channel for channel."""
    out = node.output[0]
    rank = len(ctx.shape(out))
    axis = attribute(node, "axis") % rank
    inputs = [name for name in node.input if name]
    if all(ctx.view(name) is None for name in inputs):
        return
    carried = {a for name in inputs if ctx.view(name) is not None for a in view_axes(ctx.view(name))}
    if carried <= {axis}:
        parts = []
        for name in inputs:
            atoms = ctx.axis_atoms(name, axis, node) if ctx.view(name) is not None else None
            if atoms is None:
                atoms = ctx.blocked_source(
                    node, ctx.shape(name)[axis], f"input {name} has no channel mapping"
                )
            parts.append(atoms)
        ctx.set_view(out, ctx.channel_view(np.concatenate(parts), out, axis))
        return
    if len(carried) > 1:
        ctx.opaque(node, "inputs carry channels on several axes")
        return
    (channel_axis,) = carried
    reference = next(
        ctx.view(n) for n in inputs if ctx.view(n) is not None and ctx.view(n).shape[channel_axis] > 1
    )
    for name in inputs:
        if ctx.shape(name)[channel_axis] == 1:
            continue
        view = ctx.view(name)
        if view is not None and ctx.const(name) is None:
            ctx.merge(reference, view, node)
        else:
            ctx.block(reference, node, f"input {name} has no channel mapping")
    ctx.set_view(out, reference)


def split_sizes(ctx: RuleContext, node: onnx.NodeProto, length: int) -> list[int] | None:
    sizes = int_list(ctx, node, 1, "split")
    if sizes is not None:
        return sizes
    count = attribute(node, "num_outputs", len(node.output))
    chunk = -(-length // count)
    return [min(chunk, length - i * chunk) for i in range(count)]


@rule("Split")
def split(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Split on the channel axis hands each output its range of channels (each keeps at least one)."""
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    axis = attribute(node, "axis", 0) % rank
    if axis not in view_axes(view):
        for out in node.output:
            ctx.set_view(out, view)
        return
    sizes = split_sizes(ctx, node, ctx.shape(x)[axis])
    atoms = ctx.axis_atoms(x, axis, node)
    if sizes is None or atoms is None:
        ctx.opaque(node, "split sizes are computed at run time")
        return
    offsets = np.cumsum([0, *sizes])
    for out, start, end in zip(node.output, offsets[:-1], offsets[1:], strict=True):
        part = atoms[start:end]
        ctx.keep_one.append(part)
        ctx.set_view(out, ctx.channel_view(part, out, axis))
    ctx.rewrite(node, "split", input=x, axis=axis)


@rule("Slice")
def slice_(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """A unit-step slice of the channel axis keeps a range of channels, a step of -1 reverses one; any
    other stride keeps them whole."""
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    starts, ends = int_list(ctx, node, 1, "starts"), int_list(ctx, node, 2, "ends")
    axes = int_list(ctx, node, 3, "axes")
    steps = int_list(ctx, node, 4, "steps")
    if starts is None or ends is None:
        ctx.opaque(node, "slice bounds are computed at run time")
        return
    axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    out_view = view
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        if axis not in view_axes(view):
            continue
        atoms = ctx.axis_atoms(x, axis, node)
        if atoms is None:
            return
        index = np.arange(atoms.size)[slice(start, end, step)]
        if step not in (1, -1):
            ctx.block(atoms, node, f"strided slice (step {step}) of the channel axis")
        else:
            ctx.keep_one.append(atoms[index])
            ctx.rewrite(
                node,
                "slice",
                input=x,
                axis=axis,
                low=int(index.min()) if index.size else 0,
                count=int(index.size),
                step=step,
                starts=starts,
                ends=ends,
                axes=axes,
                steps=steps,
            )
        out_view = ctx.channel_view(atoms[index], node.output[0], axis)
    ctx.set_view(node.output[0], out_view)


@rule("Gather")
def gather(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Constant 1-D indices on the channel axis reorder or pick channels; they are remapped after pruning."""
    x, indices_name = node.input
    view, indices = ctx.view(x), ctx.value(indices_name)
    if view is None:
        return
    rank = len(ctx.shape(x))
    axis = attribute(node, "axis", 0) % rank
    if indices is None or indices.ndim > 1:
        ctx.opaque(node, "gather indices are computed or multi-dimensional")
        return
    if axis not in view_axes(view):
        ctx.set_view(node.output[0], view if indices.ndim == 1 else np.squeeze(view, axis=axis))
        return
    atoms = ctx.axis_atoms(x, axis, node)
    if atoms is None or indices.ndim == 0:
        ctx.opaque(node, "a single channel is picked out of the channel axis")
        return
    picked = atoms[np.asarray(indices, dtype=np.int64) % atoms.size]
    ctx.keep_one.append(picked)
    ctx.set_view(node.output[0], ctx.channel_view(picked, node.output[0], axis))
    ctx.rewrite(node, "gather", input=x, output=node.output[0], axis=axis, indices=np.asarray(indices))


@rule("Transpose")
def transpose(ctx: RuleContext, node: onnx.NodeProto) -> None:
    view = ctx.view(node.input[0])
    if view is None:
        return
    perm = attribute(node, "perm") or list(reversed(range(view.ndim)))
    ctx.set_view(node.output[0], view.transpose(perm))


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Any reshape: the positions' channel labels are reshaped with the data.  Flattening channels with
    space gives each channel a block of features; splitting the channel axis (channel shuffle) ties
    channels across the split so that removals stay rectangular."""
    x, out = node.input[0], node.output[0]
    view = ctx.view(x)
    if view is None:
        return
    in_shape, out_shape = ctx.shape(x), ctx.shape(out)
    if int(np.prod(in_shape)) != int(np.prod(out_shape)):
        ctx.opaque(node, "input and output sizes differ")
        return
    new_view = compress(np.broadcast_to(view, in_shape).reshape(out_shape))
    axes = view_axes(new_view)
    if len(axes) > 1:
        keep_axis = max(axes, key=lambda a: (new_view.shape[a], a))
        for index in range(new_view.shape[keep_axis]):
            line = new_view.take(index, axis=keep_axis).ravel()
            ctx.merge(line[:1], line, node)
    ctx.set_view(out, new_view)
    if node.op_type == "Reshape":
        ctx.rewrite(node, "reshape", input=x, output=out)


@rule(*REDUCE_OPS)
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


@rule("Softmax", "LogSoftmax", "Hardmax")
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


@rule("Pad")
def pad(ctx: RuleContext, node: onnx.NodeProto) -> None:
    x = node.input[0]
    view = ctx.view(x)
    if view is None:
        return
    rank = len(ctx.shape(x))
    pads = int_list(ctx, node, 1, "pads")
    axes = int_list(ctx, node, 3, "axes") if input_at(node, 3) else list(range(rank))
    if pads is None:
        ctx.opaque(node, "pads are computed at run time")
        return
    padded = {axes[i] % rank for i in range(len(axes)) if pads[i] or pads[i + len(axes)]}
    if padded & set(view_axes(view)):
        ctx.opaque(node, "padding adds channels")
        return
    ctx.set_view(node.output[0], view)


@rule("Resize", "Upsample")
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
        ctx.rewrite(node, "resize", output=node.output[0])
    ctx.set_view(node.output[0], view)


@rule("Shape", "Size")
def shape_of(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Shape arithmetic reads sizes, not values; reshapes fed by it are checked by verification."""
