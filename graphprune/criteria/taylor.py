"""First-order Taylor importance (Molchanov et al. 2019; Gate Decorator's score, You et al. 2019).

The channel's score is |sum over data of a * dL/da| over its judged feature maps (the same tensors the
activation criteria read): the first-order change of the loss if the channel were zeroed.  It is
computed as Gate Decorator does: a gate phi = 1 multiplies each judged tensor per channel, and
dL/dphi = sum(a * dL/da).  The gates are added to the ONNX graph as extra graph inputs, the graph goes
to PyTorch through the torch bridge's fold-back (onnx2torch), and one backward pass per calibration batch
of the cross-entropy loss accumulates the gate gradients.  mode "sum" takes |sum over batches| (the
estimate above); mode "batch" sums |per-batch gradient| (Gate Decorator's released code).

This module is torch-free: it gates the graph, turns gradients into scores and reads the gradients from
`ScoringInputs.gate_gradients` (criteria.base.GateGradients); graphprune.api supplies the PyTorch
implementation, graphprune.torch_bridge.taylor.gate_gradients (fold-back, loss, backward, accumulation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.criteria.activation import tensor_scores
from graphprune.criteria.base import Criterion, GateGradientSums, ScoringInputs
from graphprune.criteria.tensors import activation_tensors, channel_axis
from graphprune.errors import CalibrationError, GraphPruneError

log = logging.getLogger(__name__)

TAYLOR_MODES = ("sum", "batch")


@dataclass(frozen=True)
class Gate:
    """A per-channel gate on `tensor`: graph input `name` of `shape` (channels on `axis`)."""

    tensor: str
    name: str
    shape: tuple[int, ...]


def gated_model(dep: DependencyGraph, tensors: list[str]) -> tuple[onnx.ModelProto, list[Gate]]:
    """A copy of the analysed model with `tensor * gate` in front of every consumer of each tensor; the
    gates are extra graph inputs after the image input (graph outputs are not gated)."""
    outputs = {value.name for value in dep.model.graph.output}
    gates = []
    for index, tensor in enumerate(t for t in tensors if t not in outputs):
        axis = channel_axis(dep, tensor)
        shape = [1] * len(dep.shapes[tensor])
        shape[axis] = dep.shapes[tensor][axis]
        gates.append(Gate(tensor, f"graphprune_gate_{index}", tuple(shape)))
    by_tensor = {gate.tensor: gate for gate in gates}
    model = onnx.ModelProto()
    model.CopyFrom(dep.model)
    nodes = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in by_tensor:
                node.input[i] = f"{name}__gated"
        nodes.append(node)
        for out in node.output:
            if out in by_tensor:
                gate = by_tensor[out]
                nodes.append(
                    helper.make_node("Mul", [out, gate.name], [f"{out}__gated"], name=f"{gate.name}_mul")
                )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.input.extend(
        helper.make_tensor_value_info(gate.name, TensorProto.FLOAT, list(gate.shape)) for gate in gates
    )
    return model, gates


def taylor_scores(gradients: GateGradientSums) -> list[np.ndarray]:
    """Per-gate, per-channel Taylor scores: the accumulated gate gradients' magnitude per sample."""
    if not gradients.samples:
        raise CalibrationError("the calibration data holds no image; pass a non-empty dataset.")
    return [np.abs(total) / gradients.samples for total in gradients.sums]


class Taylor(Criterion):
    """|sum of activation x gradient| per channel, on labelled calibration data (needs torch)."""

    name = "taylor"
    needs_data = True

    def __init__(self, aggregate: str = "sum", mode: str = "sum", batch_size: int = 32) -> None:
        super().__init__(aggregate)
        if mode not in TAYLOR_MODES:
            raise GraphPruneError(f"unknown Taylor mode {mode!r}; choose one of {', '.join(TAYLOR_MODES)}.")
        self.mode = mode
        self.batch_size = batch_size
        self.scores: dict[str, np.ndarray] = {}
        self.tensors: dict[int, list[str]] = {}

    def prepare(self, inputs: ScoringInputs) -> None:
        if inputs.calibration is None:
            raise CalibrationError(
                "criterion 'taylor' needs labelled calibration data; give --calib DATA (calib= in Python)."
            )
        inputs.calibration.require_labels("criterion 'taylor' (loss gradients)")
        if inputs.gate_gradients is None:
            raise GraphPruneError(
                "criterion 'taylor' needs ScoringInputs.gate_gradients; score it through graphprune.api."
            )
        self.tensors = activation_tensors(inputs.dep)
        names = list(dict.fromkeys(t for tensors in self.tensors.values() for t in tensors))
        model, gates = gated_model(inputs.dep, names)
        gradients = inputs.gate_gradients(
            model, [gate.shape for gate in gates], inputs.calibration.batches(self.batch_size), self.mode
        )
        values = taylor_scores(gradients)
        self.scores = {gate.tensor: value for gate, value in zip(gates, values, strict=True)}
        log.info("taylor: scored %d tensors on %d samples", len(gates), len(inputs.calibration))

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None:
        tensors = [t for t in self.tensors.get(group.index, []) if t in self.scores]
        return tensor_scores(inputs.dep, group, tensors, self.scores, self.aggregate)
