"""OpSpec: everything graphprune knows about one ONNX op type, in one record.

- `rule`: how channels flow through the node (graphprune.ops.context.RuleContext); an op without a
  rule blocks every channel that reaches it.
- `macs`: its multiply-accumulates on Torch-Pruning's scale (graphprune.runtime.cost), split into the
  part that reads every kept input channel for every kept output channel and the part per output
  element, so planning can predict the MACs of a removal without surgery.
- `size_inputs`: inputs holding sizes, bounds or indices rather than data (their run-time values are
  computed once at batch 1 so rules can read them).
- `buffer_inputs`: inputs that are framework buffers, not parameters (BN running statistics).
- `judged_through`: a producer's feature map is followed through the op to the map the next layer
  reads (graphprune.criteria.tensors).
- `nonnegative`: the op never outputs a negative value.
- `fold`: the op only rearranges a constant; model_io.clean replaces it by the folded initializer.

Surgery rewrites are typed `Rewrite` subclasses defined beside the rule that records them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from graphprune.ops.context import RuleContext

Rule = Callable[[RuleContext, onnx.NodeProto], None]


class NodeShapes(Protocol):
    """Shapes and attributes of one node, as a MAC formula reads them."""

    def has_input(self, index: int) -> bool: ...

    def in_shape(self, index: int) -> tuple[int, ...]: ...

    def out_shape(self, index: int = 0) -> tuple[int, ...]: ...

    def attr(self, name: str, default: int) -> int: ...


@dataclass(frozen=True)
class Macs:
    """A node's MACs: `mixing` read every input channel for every output channel (they scale with the
    kept fractions of both), `per_output` are spent per output element (bias, normalisation, pooling,
    depthwise filters: they scale with the kept output channels only)."""

    mixing: int = 0
    per_output: int = 0

    @property
    def total(self) -> int:
        return self.mixing + self.per_output


MacFormula = Callable[[NodeShapes], Macs]
# (the node's constant inputs (None where absent), its attributes) -> the folded value, or None
Fold = Callable[[list[np.ndarray | None], dict[str, object]], np.ndarray | None]


@dataclass(frozen=True)
class OpSpec:
    """One op type's channel rule, MAC formula and flags (see the module docstring)."""

    op_type: str
    rule: Rule | None = None
    macs: MacFormula | None = None
    size_inputs: tuple[int, ...] = ()
    buffer_inputs: frozenset[int] = frozenset()
    judged_through: bool = False
    nonnegative: bool = False
    fold: Fold | None = None


OPS: dict[str, OpSpec] = {}


def register(*op_types: str, **fields: object) -> None:
    """Record one OpSpec per op type (each op type is registered once)."""
    for op_type in op_types:
        if op_type in OPS:
            raise ValueError(f"op type {op_type} is registered twice")
        OPS[op_type] = OpSpec(op_type, **fields)  # type: ignore[arg-type]


def op(*op_types: str, **fields: object) -> Callable[[Rule], Rule]:
    """Decorator: register the function as the channel rule of `op_types` (with the other fields)."""

    def decorate(rule: Rule) -> Rule:
        register(*op_types, rule=rule, **fields)
        return rule

    return decorate


# MAC formulas shared by several op modules ------------------------------------------------------------
def output_elements(node: NodeShapes) -> Macs:
    return Macs(per_output=math.prod(node.out_shape()))


def input_elements(node: NodeShapes) -> Macs:
    return Macs(per_output=math.prod(node.in_shape(0)))


def bias_macs(node: NodeShapes, index: int = 2) -> int:
    """One MAC per output element when the node has a bias input."""
    return math.prod(node.out_shape()) if node.has_input(index) else 0
