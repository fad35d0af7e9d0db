"""Accuracy of an ONNX classifier through onnxruntime (no torch needed)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx

from graphprune.data.dataset import ArrayDataset
from graphprune.errors import DataError
from graphprune.runtime.session import make_session

EVAL_BATCH = 256


def evaluate_onnx(
    model: onnx.ModelProto | str | os.PathLike[str],
    ds: ArrayDataset,
    batch_size: int = EVAL_BATCH,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> float:
    """Top-1 accuracy of an ONNX classifier on `ds`, run through onnxruntime.

    A model with a fixed batch dimension is fed batches of exactly that size (the tail padded).
    `on_batch(images)` is called after each batch (a progress bar's update).
    """
    if len(ds) == 0:
        raise DataError(f"Dataset '{ds.name}' is empty; evaluate on a dataset with samples.")
    ds.require_labels("accuracy")
    session = make_session(model, provider=provider, threads=threads)
    graph_input = session.get_inputs()[0]
    fixed = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else None
    expected = tuple(graph_input.shape[1:])
    if all(isinstance(d, int) for d in expected) and expected != ds.sample_shape:
        layout = (
            " (a channels-last model: lay the images out for it with dataset.laid_out(True), or load them "
            "with shape=graphprune.runtime.shapes.image_shape(model))"
            if expected == (*ds.sample_shape[1:], ds.sample_shape[0])
            else ""
        )
        raise DataError(
            f"The model expects inputs {expected} but dataset '{ds.name}' has images {ds.sample_shape}"
            f"{layout}; evaluate on matching data."
        )
    correct = 0
    for images, labels in ds.batches(fixed or batch_size):
        count = len(images)
        if fixed is not None and count < fixed:
            images = np.concatenate([images, np.zeros((fixed - count, *images.shape[1:]), np.float32)])
        logits = np.asarray(session.run(None, {graph_input.name: images})[0])
        if logits.ndim != 2:
            raise DataError(
                f"accuracy needs a classifier whose first output is [N, classes], but it has shape "
                f"{logits.shape}."
            )
        correct += int((logits[:count].argmax(1) == labels).sum())
        if on_batch is not None:
            on_batch(count)
    return correct / len(ds)
