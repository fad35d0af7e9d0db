"""Which tensors judge a group's channels, and the activation statistics measured on them.

For every producer of the group's channels (a Conv, ConvTranspose, Gemm or MatMul whose output weights
follow them, depthwise convs included) the feature map the next layer reads: the producer's output
followed through BatchNormalization / InstanceNormalization, unary activations and channel-preserving
Add / Sum / Mul (a residual sum, an SE scaling) for as long as each tensor has that op as its only
consumer and the channels stay the same classes.  So a plain conv is judged after its BN and ReLU, and a
residual stream by the maps after each sum and its ReLU (where APoZ and HRank are defined), and the
fetched maps are the ones onnxruntime materialises anyway.  The measuring itself is the runtime's
(graphprune.runtime.activations.stream_statistics).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.ops import OPS
from graphprune.ops.atoms import view_axes
from graphprune.ops.context import MemberKind, Role
from graphprune.runtime.activations import STATISTICS, ChannelStats, JudgedTensor, stream_statistics

if TYPE_CHECKING:
    from graphprune.data.dataset import ArrayDataset

PRODUCER_KINDS = frozenset({MemberKind.CONV_OUT, MemberKind.LINEAR_OUT})


@dataclass
class ActivationStats:
    """Statistics of every judged tensor, and which tensors judge which group."""

    tensors: dict[str, ChannelStats]
    groups: dict[int, list[str]]
    samples: int
    statistics: frozenset[str]

    def group_tensors(self, group: Group) -> list[str]:
        return self.groups.get(group.index, [])


def channel_axis(dep: DependencyGraph, tensor: str) -> int | None:
    """The one axis along which `tensor` carries channels, or None."""
    view = dep.views.get(tensor)
    axes = view_axes(view) if view is not None else ()
    return axes[0] if len(axes) == 1 else None


def activation_tensors(dep: DependencyGraph) -> dict[int, list[str]]:
    """Per prunable group, the feature maps its channels are judged by (see the module docstring)."""
    consumers: dict[str, list] = defaultdict(list)
    for node in dep.model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    nodes = {node.name: node for node in dep.model.graph.node}
    outputs = {value.name for value in dep.model.graph.output}

    def same_channels(a: str, b: str) -> bool:
        return b in dep.views and np.array_equal(dep.roots[dep.views[a]], dep.roots[dep.views[b]])

    def tail(tensor: str) -> str:
        while tensor not in outputs and len(consumers[tensor]) == 1:
            (node,) = consumers[tensor]
            spec = OPS.get(node.op_type)
            if spec is None or not spec.judged_through or not same_channels(tensor, node.output[0]):
                break
            tensor = node.output[0]
        return tensor

    result: dict[int, list[str]] = {}
    for group in dep.prunable_groups:
        tensors: list[str] = []
        for member in group.members:
            if member.kind not in PRODUCER_KINDS or member.role is not Role.PRODUCER:
                continue
            tensor = tail(nodes[member.node].output[0])
            if tensor not in tensors and channel_axis(dep, tensor) is not None:
                tensors.append(tensor)
        if tensors:
            result[group.index] = tensors
    return result


def position_atoms(dep: DependencyGraph, tensor: str) -> np.ndarray:
    """The atom of each channel position of a judged tensor."""
    return dep.views[tensor].ravel()


def nonnegative(dep: DependencyGraph, tensor: str) -> bool:
    """Whether the op producing `tensor` never outputs a negative value."""
    node = next((n for n in dep.model.graph.node if tensor in n.output), None)
    if node is None:
        return False
    if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in dep.constants:
        return float(np.min(dep.constants[node.input[1]])) >= 0.0
    return node.op_type in OPS and OPS[node.op_type].nonnegative


def judged_tensor(dep: DependencyGraph, tensor: str) -> JudgedTensor:
    """The runtime's description of a judged feature map."""
    axis = channel_axis(dep, tensor)
    shape = dep.shapes[tensor]
    return JudgedTensor(tensor, axis, len(shape), shape[axis], nonnegative(dep, tensor))


def collect_activations(
    dep: DependencyGraph,
    data: ArrayDataset | Iterable[np.ndarray | tuple[np.ndarray, ...]],
    *,
    statistics: Iterable[str] = STATISTICS,
    **options: Any,
) -> ActivationStats:
    """Stream calibration data through the analysed model once and return the statistics of every
    judged tensor (options: those of graphprune.runtime.activations.stream_statistics)."""
    groups = activation_tensors(dep)
    names = list(dict.fromkeys(t for tensors in groups.values() for t in tensors))
    wanted = frozenset(statistics)
    stats, seen = stream_statistics(
        dep.model, [judged_tensor(dep, name) for name in names], data, statistics=wanted, **options
    )
    return ActivationStats(stats, groups, seen, wanted)
