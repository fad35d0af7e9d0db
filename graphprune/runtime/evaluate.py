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
) -> float:
    """Top-1 accuracy of an ONNX classifier on `ds`, run through onnxruntime (see top_k_correct)."""
    return top_k_correct(model, ds, batch_size, provider=provider, threads=threads)[0] / len(ds)


def top_k_correct(
    model: onnx.ModelProto | str | os.PathLike[str],
    ds: ArrayDataset,
    batch_size: int = EVAL_BATCH,
    *,
    ks: tuple[int, ...] = (1,),
    provider: str = "cpu",
    threads: int | None = None,
    on_batch: Callable[[int], object] | None = None,
) -> list[int]:
    """How many of `ds`'s images an ONNX classifier ranks the right class within its top k, for each k
    of `ks` (k above the class count counts every image), run through onnxruntime.

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
    correct = [0] * len(ks)
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
        # the right class's rank: the classes scoring above it, and those tied with it that come first
        # (as argmax breaks ties)
        scores = logits[:count]
        right = scores[np.arange(count), labels][:, None]
        before = np.arange(scores.shape[1])[None, :] < labels[:, None]
        rank = ((scores > right) | ((scores == right) & before)).sum(axis=1)
        correct = [total + int((rank < k).sum()) for total, k in zip(correct, ks, strict=True)]
        if on_batch is not None:
            on_batch(count)
    return correct
