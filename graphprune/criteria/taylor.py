"""First-order Taylor importance (Molchanov et al. 2019; Gate Decorator's score, You et al. 2019).

The channel's score is |sum over data of a * dL/da| over its judged feature maps (the same tensors the
activation criteria read): the first-order change of the loss if the channel were zeroed.  It is
computed as Gate Decorator does: a gate phi = 1 multiplies each judged tensor per channel, and
dL/dphi = sum(a * dL/da).  The gates are added to the ONNX graph as extra graph inputs, the graph goes
to PyTorch through the torch bridge's fold-back (onnx2torch), and one backward pass per calibration batch
of the cross-entropy loss accumulates the gate gradients.  mode "sum" takes |sum over batches| (the
estimate above); mode "batch" sums |per-batch gradient| (Gate Decorator's released code).

torch is imported only when a Taylor score is computed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.criteria.activation import tensor_scores
from graphprune.criteria.base import Criterion, ScoringInputs
from graphprune.errors import CalibrationError, GraphPruneError
from graphprune.runtime.activations import activation_tensors, channel_axis

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


def taylor_from_module(
    module: object,
    gate_shapes: list[tuple[int, ...]],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    mode: str = "sum",
) -> list[np.ndarray]:
    """Per-gate, per-channel Taylor scores of a torch module called as module(images, *gates) -> logits,
    over labelled batches, with the summed cross-entropy loss (scores are per sample: divided by the
    sample count)."""
    import torch

    module.eval()
    gates = [torch.ones(shape, requires_grad=True) for shape in gate_shapes]
    totals = [np.zeros(int(np.prod(shape))) for shape in gate_shapes]
    samples = 0
    for images, labels in batches:
        try:
            logits = module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), *gates)
        except RuntimeError as exc:
            raise CalibrationError(
                f"the model could not run on a calibration batch of shape {images.shape} ({exc}); pass images "
                "shaped like the model input."
            ) from exc
        logits = logits[0] if isinstance(logits, tuple | list) else logits
        _check_logits(tuple(logits.shape), labels)
        loss = torch.nn.functional.cross_entropy(
            logits, torch.from_numpy(labels.astype(np.int64)), reduction="sum"
        )
        grads = torch.autograd.grad(loss, gates, allow_unused=True)
        for total, grad in zip(totals, grads, strict=True):
            if grad is not None:
                values = grad.detach().double().numpy().ravel()
                total += np.abs(values) if mode == "batch" else values
        samples += len(labels)
    if not samples:
        raise CalibrationError("the calibration data holds no image; pass a non-empty dataset.")
    return [np.abs(total) / samples for total in totals]


def _check_logits(shape: tuple[int, ...], labels: np.ndarray) -> None:
    if len(shape) != 2 or shape[0] != len(labels) or int(labels.max()) >= shape[1]:
        raise CalibrationError(
            f"criterion 'taylor' needs a classifier: the model's first output has shape {shape} for "
            f"{len(labels)} labels up to {int(labels.max())}; use a model whose output is [N, classes]."
        )


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
        try:
            from graphprune.torch_bridge.foldback import onnx_to_module
        except ImportError as exc:
            raise GraphPruneError(
                f"criterion 'taylor' needs torch and onnx2torch ({exc}); install graphprune[torch]."
            ) from exc
        self.tensors = activation_tensors(inputs.dep)
        names = list(dict.fromkeys(t for tensors in self.tensors.values() for t in tensors))
        model, gates = gated_model(inputs.dep, names)
        module = onnx_to_module(model)
        values = taylor_from_module(
            module, [gate.shape for gate in gates], inputs.calibration.batches(self.batch_size), self.mode
        )
        self.scores = {gate.tensor: value for gate, value in zip(gates, values, strict=True)}
        log.info("taylor: scored %d tensors on %d samples", len(gates), len(inputs.calibration))

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None:
        tensors = [t for t in self.tensors.get(group.index, []) if t in self.scores]
        return tensor_scores(inputs.dep, group, tensors, self.scores, self.aggregate)
