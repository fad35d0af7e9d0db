"""Gate gradients for the Taylor criterion through PyTorch (criteria.base.GateGradients).

graphprune.criteria.taylor gates the ONNX graph and turns the gradients into scores without torch;
this module folds the gated graph into PyTorch (onnx2torch), runs one backward pass of the summed
cross-entropy loss per labelled batch and accumulates dL/dgate ("sum") or |dL/dgate| ("batch").
graphprune.api hands `gate_gradients` to the criterion, importing this module only when it is called.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import torch

from graphprune.criteria.base import GateGradientSums
from graphprune.errors import CalibrationError
from graphprune.torch_bridge.foldback import onnx_to_module


def gate_gradients(
    model: onnx.ModelProto,
    gate_shapes: list[tuple[int, ...]],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    mode: str = "sum",
) -> GateGradientSums:
    """Accumulated gradients of the summed cross-entropy w.r.t. each gate over labelled batches, for a
    gated model whose graph inputs are the images, then the gates, and whose first output is the logits."""
    module = onnx_to_module(model)
    module.eval()
    gates = [torch.ones(shape, requires_grad=True) for shape in gate_shapes]
    sums = [np.zeros(int(np.prod(shape))) for shape in gate_shapes]
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
        for total, grad in zip(sums, grads, strict=True):
            if grad is not None:
                values = grad.detach().double().numpy().ravel()
                total += np.abs(values) if mode == "batch" else values
        samples += len(labels)
    return GateGradientSums(sums, samples)


def _check_logits(shape: tuple[int, ...], labels: np.ndarray) -> None:
    if len(shape) != 2 or shape[0] != len(labels) or int(labels.max()) >= shape[1]:
        raise CalibrationError(
            f"criterion 'taylor' needs a classifier: the model's first output has shape {shape} for "
            f"{len(labels)} labels up to {int(labels.max())}; use a model whose output is [N, classes]."
        )
