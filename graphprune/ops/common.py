"""Helpers the op rules share: optional inputs and integer lists given as inputs or attributes."""

from __future__ import annotations

import numpy as np
import onnx

from graphprune.onnxutil import attribute
from graphprune.ops.context import RuleContext


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
