"""What an op rule sees and records while the dependency graph is built."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.ops.atoms import AtomTable, channel_view, view_axes


class Role(StrEnum):
    """How a parameter slice relates to its channels.

    PRODUCER slices belong to the channel itself (a filter, a BN scale) and vanish with it.
    CONSUMER slices read a channel (an input slice of the next conv); the masked reference zeroes them.
    """

    PRODUCER = "producer"
    CONSUMER = "consumer"


class MemberKind(StrEnum):
    """What a sliced initializer is to its node: criteria pick the kinds they read (filters for L1,
    BN scales for Network Slimming)."""

    CONV_IN = "conv_in"
    CONV_OUT = "conv_out"
    LINEAR_IN = "linear_in"
    LINEAR_OUT = "linear_out"
    BIAS = "bias"
    BN_SCALE = "bn_scale"
    BN_BIAS = "bn_bias"
    BN_MEAN = "bn_mean"
    BN_VAR = "bn_var"
    ELEMENTWISE = "elementwise"


@dataclass
class ParamMember:
    """Initializer `name` follows `atoms` along `axis` (for a grouped conv input, per group)."""

    name: str
    axis: int
    atoms: np.ndarray
    role: Role
    node: str
    op: str
    kind: MemberKind
    conv_groups: int = 1


@dataclass(frozen=True)
class GroupedConv:
    """A grouped (not depthwise) conv's channels split by conv group: `inputs` (None when its input
    channels are not prunable) and `outputs`, atoms per conv group.  Every conv group loses the same
    number of channels; where analysis finds the conv `droppable`, conv groups may instead lose all
    their input and output channels at once (the conv then has fewer groups)."""

    node: str
    inputs: list[np.ndarray] | None
    outputs: list[np.ndarray]

    @property
    def sides(self) -> list[list[np.ndarray]]:
        """The atom lists whose conv-group parts must lose equal counts."""
        return [parts for parts in (self.inputs, self.outputs) if parts is not None]

    def problem(self, removed: Callable[[np.ndarray], np.ndarray], droppable: bool) -> str | None:
        """Why a removal (`removed(atoms)` -> boolean per atom) breaks this conv's groups, or None."""
        gone = [[int(removed(part).sum()) for part in parts] for parts in self.sides]
        whole = [
            [count == part.size for count, part in zip(counts, parts, strict=True)]
            for counts, parts in zip(gone, self.sides, strict=True)
        ]
        if droppable and len(gone) == 2 and whole[0] != whole[1]:
            return (
                f"grouped conv {self.node} would lose every input channel of a conv group but not every "
                "output channel, or the reverse"
            )
        dropped = whole[0] if droppable and len(gone) == 2 else [False] * len(self.outputs)
        for counts in gone:
            left = {count for count, out in zip(counts, dropped, strict=True) if not out}
            if len(left) > 1:
                return f"grouped conv {self.node} would lose unequal channel counts per group {sorted(left)}"
        return None


class Sizes(Protocol):
    """What a rewrite may ask surgery about tensor sizes after the removal."""

    opset: int

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The tensor's shape before pruning (batch 1)."""

    def pruned_shape(self, tensor: str) -> list[int]:
        """The tensor's shape after pruning (batch 1)."""

    def kept(self, tensor: str, axis: int) -> np.ndarray:
        """Which positions along `axis` of the tensor survive (boolean)."""


@dataclass(frozen=True)
class Rewrite(ABC):
    """A node whose attributes or constant inputs must be recomputed after pruning: each op module
    defines its own typed subclass next to the rule that records it."""

    node: str

    @abstractmethod
    def apply(self, node: gs.Node, sizes: Sizes) -> None:
        """Update the (onnx-graphsurgeon) node for the pruned sizes."""


class RuleContext:
    """The state op rules read (shapes, constants, views) and write (views, ties, members, rewrites)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        constants: dict[str, np.ndarray],
        computed: dict[str, np.ndarray],
        opset: int,
    ) -> None:
        self.shapes = shapes
        self.constants = constants
        self.computed = computed
        self.opset = opset
        self.table = AtomTable()
        self.views: dict[str, np.ndarray] = {}
        self.members: dict[tuple[str, int], ParamMember] = {}
        self.grouped_convs: list[GroupedConv] = []
        self.keep_one: list[np.ndarray] = []
        self.rewrites: list[Rewrite] = []
        self.blocked_nodes: dict[str, str] = {}

    # reading -----------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def value(self, name: str) -> np.ndarray | None:
        """A constant, or a small integer tensor computed from shapes (its value at batch 1)."""
        if not name:
            return None
        return self.constants[name] if name in self.constants else self.computed.get(name)

    def view(self, name: str) -> np.ndarray | None:
        return self.views.get(name)

    def axis_atoms(self, name: str, axis: int, node: onnx.NodeProto) -> np.ndarray | None:
        """Atoms of tensor `name` along `axis` as a 1-D array, or None if it carries no channel mapping.

        A view whose channels run along another axis cannot be read this way; it is blocked.
        """
        view = self.view(name)
        if view is None:
            return None
        rank = len(self.shape(name))
        axis = axis % rank
        if set(view_axes(view)) - {axis}:
            self.block(view, node, f"channels arrive on axis {view_axes(view)} but the op reads axis {axis}")
            return None
        return np.broadcast_to(
            view, view.shape[:axis] + (self.shape(name)[axis],) + view.shape[axis + 1 :]
        ).ravel()

    # writing -----------------------------------------------------------------------------------
    def set_view(self, name: str, view: np.ndarray | None) -> None:
        """Record a tensor's view; channels folded into the batch axis (axis 0) are kept whole, since
        views are built at batch 1 and could not follow a different batch."""
        if view is None or not name:
            return
        if view.ndim and view.shape[0] > 1:
            self.block(view, f"tensor {name}", "channels are folded into the batch axis")
            return
        self.views[name] = view

    def new_source(self, node: onnx.NodeProto, size: int, param: str | None = None) -> np.ndarray:
        """Fresh prunable channels produced by `node`; a layer always keeps at least one."""
        atoms = self.table.new_block(node.output[0], node.name, node.op_type, size, param)
        self.keep_one.append(atoms)
        return atoms

    def blocked_source(self, node: onnx.NodeProto, size: int, why: str) -> np.ndarray:
        atoms = self.table.new_block(f"{node.name}:fixed", node.name, node.op_type, size, fixed=True)
        self.table.block(atoms, f"{node.name} ({node.op_type}): {why}")
        return atoms

    def merge(self, a: np.ndarray, b: np.ndarray, node: onnx.NodeProto) -> None:
        self.table.merge(a, b, node.name, node.op_type)

    def block(self, atoms: np.ndarray | None, node: onnx.NodeProto | str, why: str) -> None:
        if atoms is None or atoms.size == 0:
            return
        label = node if isinstance(node, str) else f"{node.name} ({node.op_type})"
        self.blocked_nodes.setdefault(label, why)
        self.table.block(atoms, f"{label}: {why}")

    def member(
        self,
        node: onnx.NodeProto,
        name: str,
        axis: int,
        atoms: np.ndarray,
        role: Role,
        kind: MemberKind,
        conv_groups: int = 1,
    ) -> None:
        """Record that initializer `name` is sliced along `axis` by `atoms`; a shared initializer ties."""
        key = (name, axis)
        existing = self.members.get(key)
        if existing is not None:
            if existing.atoms.shape == atoms.shape and existing.conv_groups == conv_groups:
                self.merge(existing.atoms, atoms, node)
            else:
                self.block(existing.atoms, node, f"initializer {name} is shared with an incompatible layout")
                self.block(atoms, node, f"initializer {name} is shared with an incompatible layout")
            return
        self.members[key] = ParamMember(name, axis, atoms, role, node.name, node.op_type, kind, conv_groups)

    def grouped_conv(
        self, node: onnx.NodeProto, in_atoms: np.ndarray | None, out_atoms: np.ndarray, groups: int
    ) -> None:
        """A grouped conv needs the same number of channels removed from each of its groups."""
        inputs = None if in_atoms is None else np.split(in_atoms, groups)
        self.grouped_convs.append(GroupedConv(node.name, inputs, np.split(out_atoms, groups)))

    def rewrite(self, rewrite: Rewrite) -> None:
        self.rewrites.append(rewrite)

    def opaque(self, node: onnx.NodeProto, why: str) -> None:
        """The op is not understood here: every channel reaching it is kept whole; its outputs are opaque."""
        for name in node.input:
            self.block(self.view(name), node, why)

    def channel_view(self, atoms: np.ndarray, name: str, axis: int) -> np.ndarray:
        return channel_view(atoms, len(self.shape(name)), axis % len(self.shape(name)))
