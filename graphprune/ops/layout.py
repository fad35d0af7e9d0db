"""Ops that move channels around: Concat, Split, Slice, Gather, Transpose, Reshape and its kin, Pad."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.onnxutil import attribute
from graphprune.ops.atoms import compress, view_axes
from graphprune.ops.common import input_at, int_list
from graphprune.ops.context import Rewrite, RuleContext, Sizes
from graphprune.ops.edits import set_constant_input, set_size_entries
from graphprune.ops.spec import op, register


@dataclass(frozen=True)
class SplitSizes(Rewrite):
    """Split sizes on the channel axis become the outputs' pruned widths."""

    axis: int

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        widths = np.asarray([sizes.pruned_shape(out.name)[self.axis] for out in node.outputs], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if sizes.opset >= 13:
            set_constant_input(node, 1, widths)
        else:
            node.attrs["split"] = widths.tolist()


@dataclass(frozen=True)
class SliceBounds(Rewrite):
    """New bounds on the channel axis; every bound input becomes a constant (channel bounds are static)."""

    input: str
    axis: int
    low: int
    count: int
    step: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    axes: tuple[int, ...]
    steps: tuple[int, ...]

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        line = sizes.kept(self.input, self.axis)
        low = int(line[: self.low].sum())
        high = low + int(line[self.low : self.low + self.count].sum())
        if self.step == 1:
            start, stop = low, high
        else:  # reversed: from the last kept position down to just before `low` (INT64_MIN: past the front)
            start, stop = high - 1, low - 1 if low > 0 else np.iinfo(np.int64).min
        starts, ends = list(self.starts), list(self.ends)
        position = self.axes.index(self.axis)
        starts[position], ends[position] = start, stop
        if "starts" in node.attrs:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
            return
        for slot, value in enumerate([starts, ends, list(self.axes), list(self.steps)], start=1):
            set_constant_input(node, slot, np.asarray(value, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class GatherIndices(Rewrite):
    """Constant channel indices are remapped to the kept channels' new positions."""

    input: str
    output: str
    axis: int
    indices: np.ndarray

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        in_line = sizes.kept(self.input, self.axis)
        out_line = sizes.kept(self.output, self.axis)
        new_position = np.cumsum(in_line) - 1
        indices = self.indices.astype(np.int64) % in_line.size
        set_constant_input(node, 1, new_position[indices[out_line]].astype(self.indices.dtype))


@dataclass(frozen=True)
class ReshapeShape(Rewrite):
    """Entries of the target shape that count channels become the pruned counts."""

    output: str

    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        old, new = sizes.shape(self.output), sizes.pruned_shape(self.output)
        changes = {
            axis: after for axis, (before, after) in enumerate(zip(old, new, strict=True)) if before != after
        }
        set_size_entries(sizes, node, 1, changes)


def _axes(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the second input (opset 13+) or the attribute."""
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in inputs[1].ravel()]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]  # type: ignore[union-attr]


def _fold_transpose(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> np.ndarray:
    return np.transpose(inputs[0], attrs.get("perm"))


def _fold_squeeze(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> np.ndarray:
    axes = _axes(inputs, attrs)
    return np.squeeze(inputs[0], axis=None if axes is None else tuple(axes))


def _fold_unsqueeze(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> np.ndarray:
    axes = _axes(inputs, attrs) or []
    rank = inputs[0].ndim + len(axes)
    return np.expand_dims(inputs[0], tuple(sorted(a % rank for a in axes)))


@op("Concat")
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


@op("Split", size_inputs=(1,))
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
    ctx.rewrite(SplitSizes(node.name, axis))


@op("Slice", size_inputs=(1, 2, 3, 4))
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
                SliceBounds(
                    node.name,
                    input=x,
                    axis=axis,
                    low=int(index.min()) if index.size else 0,
                    count=int(index.size),
                    step=step,
                    starts=tuple(starts),
                    ends=tuple(ends),
                    axes=tuple(axes),
                    steps=tuple(steps),
                )
            )
        out_view = ctx.channel_view(atoms[index], node.output[0], axis)
    ctx.set_view(node.output[0], out_view)


@op("Gather", size_inputs=(1,))
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
    ctx.rewrite(GatherIndices(node.name, x, node.output[0], axis, np.asarray(indices)))


def transpose(ctx: RuleContext, node: onnx.NodeProto) -> None:
    view = ctx.view(node.input[0])
    if view is None:
        return
    perm = attribute(node, "perm") or list(reversed(range(view.ndim)))
    ctx.set_view(node.output[0], view.transpose(perm))


@op("Reshape", size_inputs=(1,))
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
        # An axis that flattens channels with space ([N, G, C/G*H*W], GroupNorm as torch exports it)
        # holds whole groups of channels: each of its lines becomes one class.  Otherwise (a channel
        # shuffle) the longer axis is kept and channels are tied across the other.
        flat = {a for a in axes if _repeats_along(new_view, a)}
        keep_axis = max(axes, key=lambda a: (a not in flat, new_view.shape[a], a))
        for index in range(new_view.shape[keep_axis]):
            line = new_view.take(index, axis=keep_axis).ravel()
            ctx.merge(line[:1], line, node)
    ctx.set_view(out, new_view)
    if node.op_type == "Reshape":
        ctx.rewrite(ReshapeShape(node.name, out))


def _repeats_along(view: np.ndarray, axis: int) -> bool:
    """Whether some line of the view along `axis` names one channel at several positions."""
    lines = np.moveaxis(view, axis, -1).reshape(-1, view.shape[axis])
    return any(np.unique(line).size < line.size for line in lines)


@op("Pad", size_inputs=(1, 3))
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


register("Transpose", rule=transpose, fold=_fold_transpose)
register("Flatten", rule=reshape)
register("Squeeze", rule=reshape, fold=_fold_squeeze)
register("Unsqueeze", rule=reshape, fold=_fold_unsqueeze)
