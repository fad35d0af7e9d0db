"""Physically remove channels from the ONNX graph, and build the masked reference it must equal.

Surgery slices every initializer member along its channel axis, then applies the typed rewrites the op
rules recorded (graphprune.ops: depthwise `group`, Reshape shapes, Split sizes, Slice bounds, Gather
indices, Resize sizes), which recompute what encodes channel counts.  onnx-graphsurgeon does the
rewiring and the final cleanup.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import Message

from graphprune.analysis.graph import DependencyGraph
from graphprune.errors import PlanError, VerificationError
from graphprune.model_io import keep_model_properties
from graphprune.onnxutil import opset_of
from graphprune.ops.context import ParamMember, Role


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
    problem = dep.conv_group_problem(lambda atoms: removed[atoms], dep.grouped_convs)
    if problem:
        raise PlanError(f"{problem}.")


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


class PrunedSizes:
    """Tensor sizes after a removal, as the ops' rewrites ask for them (graphprune.ops.context.Sizes)."""

    def __init__(self, dep: DependencyGraph, keep: np.ndarray) -> None:
        self.dep, self.keep, self.opset = dep, keep, opset_of(dep.model)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.dep.shapes[tensor]

    def kept(self, tensor: str, axis: int) -> np.ndarray:
        return axis_keep(self.dep.views[tensor], self.keep, axis, tensor)

    def pruned_shape(self, tensor: str) -> list[int]:
        shape = list(self.dep.shapes[tensor])
        view = self.dep.views.get(tensor)
        if view is None:
            return shape
        for axis in range(view.ndim):
            if view.shape[axis] > 1:
                shape[axis] = int(self.kept(tensor, axis).sum())
        return shape


def slice_member(values: np.ndarray, member: ParamMember, keep: np.ndarray) -> np.ndarray:
    """Keep the member's surviving positions; a grouped conv's input axis is sliced group by group (the
    conv groups that lost every input channel lost their output rows already: members slicing a
    weight's output axis come first)."""
    mask = keep[member.atoms]
    if member.conv_groups == 1:
        return np.compress(mask, values, axis=member.axis)
    local = [part for part in np.split(mask, member.conv_groups) if part.any()]
    rows = np.split(values, len(local), axis=0)
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


def _without_weights(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of `model` whose initializers in `names` are data-free placeholders (name, type, dims)."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for init in model.graph.initializer:
        if init.name in names:
            light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        else:
            light.graph.initializer.add().CopyFrom(init)
    return light


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif hasattr(value, "extend"):
            getattr(target, field.name).extend(value)
        else:
            setattr(target, field.name, value)


def apply_removal(dep: DependencyGraph, removed: np.ndarray) -> onnx.ModelProto:
    """A new, smaller model with the removed channels gone (the analysed model is not modified).

    onnx-graphsurgeon works on a copy without the parameters' data; the parameters are sliced from the
    analysis' arrays and the untouched ones are attached once, at the end.
    """
    check_removal(dep, removed)
    keep = ~removed
    params = {member.name for member in dep.members.values()}
    graph = gs.import_onnx(_without_weights(dep.model, params))
    tensors = graph.tensors()
    members = sorted(dep.members.values(), key=lambda m: m.conv_groups > 1)
    sliced: dict[str, np.ndarray] = {}
    for member in members:
        if keep[member.atoms].all():
            continue
        values = sliced.get(member.name, dep.constants[member.name])
        sliced[member.name] = slice_member(values, member, keep)
    for name, values in sliced.items():
        tensors[name].values = np.ascontiguousarray(values)
    nodes = {node.name: node for node in graph.nodes}
    sizes = PrunedSizes(dep, keep)
    for rewrite in dep.rewrites:
        rewrite.apply(nodes[rewrite.node], sizes)
    for value in graph.inputs + graph.outputs:
        value.shape = value.shape
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    originals = {init.name: init for init in dep.model.graph.initializer if init.name in params}
    for init in model.graph.initializer:
        if init.name in originals and init.name not in sliced:
            init.CopyFrom(originals[init.name])
    model.ir_version = dep.model.ir_version
    keep_model_properties(model, dep.model)
    del model.opset_import[:]
    model.opset_import.extend(dep.model.opset_import)
    del model.graph.value_info[:]
    return model
