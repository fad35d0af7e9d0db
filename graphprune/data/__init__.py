"""Datasets as numpy arrays (Fashion-MNIST, .npz, image folders, synthetic) and a torch loader for training.

Importing this package does not import torch; only `torch_loader` does, when called.
"""

from __future__ import annotations

from graphprune.data.dataset import ArrayDataset, ImageInput
from graphprune.data.loader import torch_loader
from graphprune.data.sources import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    dataset_parts,
    load_calibration,
    load_dataset,
    load_splits,
)

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ArrayDataset",
    "dataset_parts",
    "ImageInput",
    "load_calibration",
    "load_dataset",
    "load_splits",
    "torch_loader",
]
