"""Physically remove channels from the ONNX graph, and build the masked reference it must equal.

Surgery slices every initializer member along its channel axis, then recomputes the attributes and
constant inputs that encode channel counts (depthwise `group`, Reshape shapes, Split sizes, Slice
bounds, Gather indices, Resize sizes).  onnx-graphsurgeon does the rewiring and the final cleanup.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis.context import ParamMember, Rewrite, Role
from graphprune.analysis.graph import DependencyGraph
from graphprune.errors import PlanError, VerificationError
from graphprune.onnxutil import opset_of


def check_removal(dep: DependencyGraph, removed: np.ndarray) -> None:
    """Refuse a removal that breaks a structural rule (blocked channel, empty layer, uneven groups)."""
    blocked = dep.table.blocked_roots()
    for root in np.unique(dep.roots[removed]):
        if int(root) in blocked:
            raise PlanError(f"channel {_label(dep, int(root))} cannot be removed: {blocked[int(root)]}.")
    for atoms in dep.keep_one:
        if atoms.size and removed[atoms].all():
            raise PlanError(
                f"the plan removes every channel of {_label(dep, int(atoms[0]))}; a layer must keep one."
            )
    for node, parts in dep.segments:
        counts = {int(removed[part].sum()) for part in parts}
        if len(counts) > 1:
            raise PlanError(
                f"grouped conv {node} would lose unequal channel counts per group {sorted(counts)}."
            )


def _label(dep: DependencyGraph, atom: int) -> str:
    block = dep.table.blocks[dep.table.block_of[atom]]
    return f"{block.node}[{atom - block.start}]"


def axis_keep(view: np.ndarray, keep: np.ndarray, axis: int, tensor: str) -> np.ndarray:
    """Which positions along `axis` of a tensor survive, checking the removal stays rectangular."""
    mask = keep[view]
    rebuilt = np.ones(mask.shape, dtype=bool)
    for a in range(view.ndim):
        rest = tuple(b for b in range(view.ndim) if b != a)
        rebuilt &= mask.any(axis=rest, keepdims=True)
    if not np.array_equal(rebuilt, mask):
        raise VerificationError(
            f"internal error: removal at tensor {tensor} is not rectangular; please report it."
        )
    others = tuple(a for a in range(view.ndim) if a != axis)
    line = mask.any(axis=others)
    return line.ravel()


def pruned_shape(dep: DependencyGraph, tensor: str, keep: np.ndarray) -> list[int]:
    shape = list(dep.shapes[tensor])
    view = dep.views.get(tensor)
    if view is None:
        return shape
    for axis in range(view.ndim):
        if view.shape[axis] > 1:
            shape[axis] = int(axis_keep(view, keep, axis, tensor).sum())
    return shape


def slice_member(values: np.ndarray, member: ParamMember, keep: np.ndarray) -> np.ndarray:
    """Keep the member's surviving positions; a grouped conv's input axis is sliced group by group."""
    mask = keep[member.atoms]
    if member.conv_groups == 1:
        return np.compress(mask, values, axis=member.axis)
    groups = member.conv_groups
    rows = np.split(values, groups, axis=0)
    local = np.split(mask, groups)
    return np.concatenate([np.compress(m, r, axis=1) for r, m in zip(rows, local, strict=True)], axis=0)


def zero_member(values: np.ndarray, member: ParamMember, keep: np.ndarray) -> np.ndarray:
    """The masked reference: removed input slices of a consumer are zeroed, nothing is removed."""
    out = values.copy()
    mask = ~keep[member.atoms]
    if member.conv_groups == 1:
        index = [slice(None)] * out.ndim
        index[member.axis] = mask
        out[tuple(index)] = 0
        return out
    groups = member.conv_groups
    rows_per_group = out.shape[0] // groups
    for g, local in enumerate(np.split(mask, groups)):
        out[g * rows_per_group : (g + 1) * rows_per_group, local] = 0
    return out


def masked_reference(dep: DependencyGraph, removed: np.ndarray) -> onnx.ModelProto:
    """The original model with every consumer's input slices of removed channels set to zero."""
    keep = ~removed
    model = onnx.ModelProto()
    model.CopyFrom(dep.model)
    by_name = {init.name: init for init in model.graph.initializer}
    for member in dep.members.values():
        if member.role is Role.CONSUMER and not keep[member.atoms].all():
            init = by_name[member.name]
            values = zero_member(onnx.numpy_helper.to_array(init), member, keep)
            init.CopyFrom(onnx.numpy_helper.from_array(values, member.name))
    return model


def apply_removal(dep: DependencyGraph, removed: np.ndarray) -> onnx.ModelProto:
    """A new, smaller model with the removed channels gone (the analysed model is not modified)."""
    check_removal(dep, removed)
    keep = ~removed
    graph = gs.import_onnx(dep.model)
    tensors = graph.tensors()
    members = sorted(dep.members.values(), key=lambda m: m.conv_groups > 1)
    sliced: dict[str, np.ndarray] = {}
    for member in members:
        if keep[member.atoms].all():
            continue
        values = sliced.get(member.name)
        values = np.asarray(tensors[member.name].values) if values is None else values
        sliced[member.name] = slice_member(values, member, keep)
    for name, values in sliced.items():
        tensors[name].values = np.ascontiguousarray(values)
    nodes = {node.name: node for node in graph.nodes}
    for rewrite in dep.rewrites:
        REWRITES[rewrite.kind](dep, nodes[rewrite.node], rewrite, keep)
    for value in graph.inputs + graph.outputs:
        value.shape = value.shape
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = dep.model.ir_version
    del model.opset_import[:]
    model.opset_import.extend(dep.model.opset_import)
    del model.graph.value_info[:]
    return model


def _new_constant(node: gs.Node, slot: int, values: np.ndarray) -> None:
    node.inputs[slot] = gs.Constant(f"{node.name}_pruned_{slot}", np.asarray(values))


def _depthwise(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    node.attrs["group"] = pruned_shape(dep, rewrite.data["input"], keep)[1]


def _reshape(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    old = list(dep.shapes[rewrite.data["output"]])
    new = pruned_shape(dep, rewrite.data["output"], keep)
    changes = {
        axis: after for axis, (before, after) in enumerate(zip(old, new, strict=True)) if before != after
    }
    _rewrite_size_vector(dep, node, 1, changes)


def _resize(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    old = list(dep.shapes[rewrite.data["output"]])
    new = pruned_shape(dep, rewrite.data["output"], keep)
    axes = [int(a) % len(old) for a in node.attrs.get("axes", range(len(old)))]
    changes = {axes.index(a): new[a] for a in range(len(old)) if old[a] != new[a] and a in axes}
    _rewrite_size_vector(dep, node, 3, changes)


def _rewrite_size_vector(dep: DependencyGraph, node: gs.Node, slot: int, changes: dict[int, int]) -> None:
    """Set entries of a shape/sizes input.  A constant is replaced; a vector computed at run time is
    left to adapt (it reads Shape of the pruned tensor) except for constant pieces of a Concat."""
    if not changes:
        return
    tensor = node.inputs[slot]
    if isinstance(tensor, gs.Constant):
        _new_constant(node, slot, _with_entries(np.asarray(tensor.values), changes))
        return
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Concat":
        return
    offset = 0
    for index, piece in enumerate(producer.inputs):
        length = len(piece.values) if isinstance(piece, gs.Constant) else dep.shapes[piece.name][0]
        local = {p - offset: v for p, v in changes.items() if offset <= p < offset + length}
        if local and isinstance(piece, gs.Constant):
            producer.inputs[index] = gs.Constant(
                f"{producer.name}_pruned_{index}", _with_entries(np.asarray(piece.values), local)
            )
        offset += length


def _with_entries(values: np.ndarray, changes: dict[int, int]) -> np.ndarray:
    """Copy of a shape vector with entries replaced; -1 (inferred) and 0 (copied) entries adapt by themselves."""
    out = values.copy()
    for position, size in changes.items():
        if out[position] not in (-1, 0):
            out[position] = size
    return out


def _split(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    axis = rewrite.data["axis"]
    sizes = [pruned_shape(dep, out.name, keep)[axis] for out in node.outputs]
    node.attrs.pop("num_outputs", None)
    if dep.model.opset_import and opset_of(dep.model) >= 13:
        if len(node.inputs) > 1:
            _new_constant(node, 1, np.asarray(sizes, dtype=np.int64))
        else:
            node.inputs.append(gs.Constant(f"{node.name}_pruned_1", np.asarray(sizes, dtype=np.int64)))
    else:
        node.attrs["split"] = sizes


def _slice(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    """New bounds on the channel axis; every bound input becomes a constant (channel bounds are static)."""
    data = rewrite.data
    line = axis_keep(dep.views[data["input"]], keep, data["axis"], data["input"])
    low = int(line[: data["low"]].sum())
    high = low + int(line[data["low"] : data["low"] + data["count"]].sum())
    if data["step"] == 1:
        start, stop = low, high
    else:  # reversed: from the last kept position down to just before `low` (INT64_MIN: past the front)
        start, stop = high - 1, low - 1 if low > 0 else np.iinfo(np.int64).min
    starts, ends = list(data["starts"]), list(data["ends"])
    position = data["axes"].index(data["axis"])
    starts[position], ends[position] = start, stop
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
        return
    values = [starts, ends, data["axes"], data["steps"]]
    for slot, value in enumerate(values, start=1):
        if slot < len(node.inputs):
            _new_constant(node, slot, np.asarray(value, dtype=np.int64))
        else:
            node.inputs.append(gs.Constant(f"{node.name}_pruned_{slot}", np.asarray(value, dtype=np.int64)))


def _gather(dep: DependencyGraph, node: gs.Node, rewrite: Rewrite, keep: np.ndarray) -> None:
    data = rewrite.data
    in_line = axis_keep(dep.views[data["input"]], keep, data["axis"], data["input"])
    out_line = axis_keep(dep.views[data["output"]], keep, data["axis"], data["output"])
    new_position = np.cumsum(in_line) - 1
    indices = data["indices"].astype(np.int64) % in_line.size
    _new_constant(node, 1, new_position[indices[out_line]].astype(data["indices"].dtype))


REWRITES: dict[str, Callable[[DependencyGraph, gs.Node, Rewrite, np.ndarray], None]] = {
    "depthwise": _depthwise,
    "reshape": _reshape,
    "split": _split,
    "slice": _slice,
    "gather": _gather,
    "resize": _resize,
}
