"""Small onnx-graphsurgeon edits that the ops' surgery rewrites share: replace a constant input, and set
entries of a shape or sizes vector (a constant, or the constant pieces of a Concat computing it)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ops.context import Sizes


def set_constant_input(node: gs.Node, slot: int, values: np.ndarray) -> None:
    """Input `slot` of the node becomes a new constant (appended when the node has fewer inputs)."""
    constant = gs.Constant(f"{node.name}_pruned_{slot}", np.asarray(values))
    if slot < len(node.inputs):
        node.inputs[slot] = constant
    else:
        node.inputs.append(constant)


def set_size_entries(sizes: Sizes, node: gs.Node, slot: int, changes: dict[int, int]) -> None:
    """Set entries of a shape/sizes input.  A constant is replaced; a vector computed at run time is
    left to adapt (it reads Shape of the pruned tensor) except for constant pieces of a Concat."""
    if not changes:
        return
    tensor = node.inputs[slot]
    if isinstance(tensor, gs.Constant):
        set_constant_input(node, slot, _with_entries(np.asarray(tensor.values), changes))
        return
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Concat":
        return
    offset = 0
    for index, piece in enumerate(producer.inputs):
        length = len(piece.values) if isinstance(piece, gs.Constant) else sizes.shape(piece.name)[0]
        local = {p - offset: v for p, v in changes.items() if offset <= p < offset + length}
        if local and isinstance(piece, gs.Constant):
            set_constant_input(producer, index, _with_entries(np.asarray(piece.values), local))
        offset += length


def _with_entries(values: np.ndarray, changes: dict[int, int]) -> np.ndarray:
    """Copy of a shape vector with entries replaced; -1 (inferred) and 0 (copied) entries adapt by themselves."""
    out = values.copy()
    for position, size in changes.items():
        if out[position] not in (-1, 0):
            out[position] = size
    return out
