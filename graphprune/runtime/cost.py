"""MACs and parameter counts of an ONNX graph, on Torch-Pruning's scale.

Convention (that of `torch_pruning.utils.count_ops_and_params`, itself ptflops', so numbers here and
in Torch-Pruning papers and READMEs line up; torchvision ResNet-18 at 224x224 gives 1.82 G / 11.69 M);
each op's formula is its OpSpec's `macs` in graphprune.ops:

- Conv: out_elems * (Cin / groups) * prod(kernel), plus out_elems when there is a bias.
- ConvTranspose: in_elems * (Cout / groups) * prod(kernel), plus out_elems for a bias.
- Gemm: M * N * K, plus M * N when C is given. MatMul: out_elems * K, batch dims broadcast.
- BatchNormalization, InstanceNormalization, GroupNormalization: 2 * in_elems (affine normalisation).
- Relu, PRelu, LeakyRelu, Elu, Gelu, Clip (ReLU6): out_elems.
- MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool: in_elems. Resize, Upsample: out_elems.
- Everything else (Add, Mul, Concat, Reshape, Sigmoid ...): 0, as for torch functionals in Torch-Pruning.

Counts are for the shapes given, so batch-1 shapes give per-sample MACs.

Params: elements of the float initialisers that nodes consume, each tensor once, excluding
BatchNormalization running mean/variance (PyTorch buffers, which Torch-Pruning does not count). An
Identity fed by an initialiser is a distinct parameter: the legacy exporter merges equal-valued
initialisers (every fresh BatchNorm's ones and zeros) and puts an Identity in front of each alias.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from graphprune.errors import GraphPruneError
from graphprune.ops import OPS, Macs

log = logging.getLogger(__name__)

Shape = Sequence[int]

_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)


@dataclass(frozen=True)
class NodeCost:
    """What one node costs: its op type, MACs (of which `mixing_macs` read every input channel for
    every output channel; see graphprune.ops.spec.Macs) and the parameters attributed to it."""

    op: str
    macs: int
    params: int
    mixing_macs: int = 0


@dataclass(frozen=True)
class CostReport:
    """Totals for a graph plus the per-node breakdown (keyed by node name) they sum from."""

    macs: int
    params: int
    per_node: dict[str, NodeCost]


class _Node:
    """Shape access for one node while its MACs are counted."""

    def __init__(self, node: onnx.NodeProto, key: str, shape_of: Callable[[str, _Node], tuple[int, ...]]):
        self.proto = node
        self.key = key
        self._shape_of = shape_of

    def has_input(self, index: int) -> bool:
        return len(self.proto.input) > index and self.proto.input[index] != ""

    def in_shape(self, index: int) -> tuple[int, ...]:
        return self._shape_of(self.proto.input[index], self)

    def out_shape(self, index: int = 0) -> tuple[int, ...]:
        return self._shape_of(self.proto.output[index], self)

    def attr(self, name: str, default: int) -> int:
        for attribute in self.proto.attribute:
            if attribute.name == name:
                return attribute.i
        return default


def count_cost(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> CostReport:
    """Count MACs and parameters of `model` (convention in the module docstring).

    `shapes` maps tensor names to concrete shapes (graphprune.runtime.shapes.tensor_shapes gives them
    at batch 1); initialiser shapes are read from the model when absent.
    """
    graph = model.graph
    static_shapes, param_sizes = _parameter_tensors(graph)

    def shape_of(name: str, node: _Node) -> tuple[int, ...]:
        if name in shapes:
            return tuple(int(d) for d in shapes[name])
        if name in static_shapes:
            return static_shapes[name]
        raise GraphPruneError(
            f"No shape is known for tensor {name!r} used by node {node.key!r} ({node.proto.op_type}); "
            "pass the shapes from graphprune.runtime.shapes.tensor_shapes(model)."
        )

    counted: set[str] = set()
    per_node: dict[str, NodeCost] = {}
    for index, proto in enumerate(graph.node):
        key = _node_key(proto, index, per_node)
        spec = OPS.get(proto.op_type)
        macs = spec.macs(_Node(proto, key, shape_of)) if spec is not None and spec.macs else Macs()
        params = 0
        if proto.op_type != "Identity":
            buffers = spec.buffer_inputs if spec is not None else frozenset()
            for position, name in enumerate(proto.input):
                if name in param_sizes and name not in counted and position not in buffers:
                    counted.add(name)
                    params += param_sizes[name]
        per_node[key] = NodeCost(proto.op_type, int(macs.total), params, int(macs.mixing))
    report = CostReport(
        macs=sum(cost.macs for cost in per_node.values()),
        params=sum(cost.params for cost in per_node.values()),
        per_node=per_node,
    )
    log.debug("Counted %d MACs and %d params over %d nodes.", report.macs, report.params, len(per_node))
    return report


def _parameter_tensors(graph: onnx.GraphProto) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Shapes of all initialisers (and Identity aliases of them), and sizes of the float ones."""
    static_shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    is_float = {init.name: init.data_type in _FLOAT_TYPES for init in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted, so alias chains resolve in one pass
        if node.op_type == "Identity" and node.input[0] in static_shapes:
            static_shapes[node.output[0]] = static_shapes[node.input[0]]
            is_float[node.output[0]] = is_float[node.input[0]]
    sizes = {name: math.prod(shape) for name, shape in static_shapes.items() if is_float[name]}
    return static_shapes, sizes


def _node_key(node: onnx.NodeProto, index: int, taken: Mapping[str, NodeCost]) -> str:
    """The node's name, or `<op>_<index>` when it is empty or already used."""
    key = node.name or f"{node.op_type}_{index}"
    return key if key not in taken else f"{key}_{index}"
