"""ArrayDataset: a labelled image set held as numpy arrays, the one form every graphprune consumer reads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from graphprune.errors import DataError


def seeded_indices(total: int, count: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random choice of `count` out of `total`, or None when all are kept."""
    if count is not None and count < 1:
        raise DataError(f"A sample needs at least 1 item, got {count}; pass a positive count.")
    if count is None or count >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


@dataclass(frozen=True)
class ImageInput:
    """A model's image input: channels, height and width, channels first ([N, C, H, W]) or last
    ([N, H, W, C]: Keras models through tf2onnx); what a dataset is converted, fitted and laid out to."""

    channels: int
    height: int
    width: int
    channels_last: bool = False


@dataclass
class ArrayDataset:
    """Normalised float32 images [N,C,H,W] (or [N,H,W,C] when `channels_last`, for a model that takes
    them so) with int64 labels [N] in 0..num_classes-1; a label-free set (calibration images only) has
    num_classes 0 and every label -1 (see `unlabelled`).  `image_norm` is the MEAN/STD its 8-bit images
    were normalised with (graphprune.data.image_norm), None for images that came as floats."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    image_norm: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise DataError(
                f"Dataset '{self.name}' needs images [N,C,H,W] and labels [N], got {self.images.shape} "
                f"and {self.labels.shape}; fix the arrays."
            )
        if not self.labelled and np.any(self.labels != -1):
            raise DataError(f"Dataset '{self.name}' has no classes, so every label must be -1.")
        if (
            self.labelled
            and len(self.labels)
            and (self.labels.min() < 0 or self.labels.max() >= self.num_classes)
        ):
            raise DataError(
                f"Dataset '{self.name}' has labels outside 0..{self.num_classes - 1}; fix the labels or num_classes."
            )

    @classmethod
    def unlabelled(cls, images: np.ndarray, name: str, image_norm: str | None = None) -> ArrayDataset:
        """Images without labels: enough for label-free criteria and recovery."""
        return cls(images, np.full(len(images), -1), 0, name, image_norm)

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def require_labels(self, purpose: str) -> None:
        """DataError unless the set has labels (`purpose` says what needs them)."""
        if not self.labelled:
            raise DataError(
                f"{purpose} needs labelled data and '{self.name}' has images only; give an .npz with a "
                "y/labels array or a folder of class sub-folders."
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One image's shape as the model takes it: (C, H, W), or (H, W, C) channels-last."""
        _, *shape = self.images.shape
        return shape[0], shape[1], shape[2]

    def laid_out(self, channels_last: bool) -> ArrayDataset:
        """The set with its images channels-last or channels-first (itself when already so)."""
        if channels_last == self.channels_last:
            return self
        order = (0, 2, 3, 1) if channels_last else (0, 3, 1, 2)
        return replace(self, images=self.images.transpose(order), channels_last=channels_last)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images, labels) batches in order, or in a seeded random order with `shuffle`."""
        if batch_size < 1:
            raise DataError(f"Batch size must be at least 1, got {batch_size}; pass a positive batch size.")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else None
        for start in range(0, len(self), batch_size):
            if order is None:
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                yield self.images[index], self.labels[index]

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """A new dataset holding the samples at `indices` (copied)."""
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def sample(self, count: int | None, seed: int = 0) -> ArrayDataset:
        """A seeded random subset of `count` samples kept in their original order (the whole set when
        `count` is None or not smaller)."""
        chosen = seeded_indices(len(self), count, seed)
        return self if chosen is None else self.subset(chosen)

    def split(self, fraction: float, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
        """Split at random into (`fraction` of the samples, the rest); each part keeps the original order."""
        if not 0.0 < fraction < 1.0:
            raise DataError(
                f"Split fraction must lie strictly between 0 and 1, got {fraction}; pick e.g. 0.9."
            )
        order = np.random.default_rng(seed).permutation(len(self))
        cut = round(fraction * len(self))
        return self.subset(np.sort(order[:cut])), self.subset(np.sort(order[cut:]))
