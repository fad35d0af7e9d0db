"""torch DataLoader over an ArrayDataset for training, with pad-and-crop + flip augmentation on tensors.

torch is imported inside the functions only, so the numpy side of graphprune.data never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphprune.data.dataset import ArrayDataset
from graphprune.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

CROP_PADDING = 2


def torch_loader(
    ds: ArrayDataset, batch_size: int, shuffle: bool = False, augment: bool = False, *, seed: int = 0
) -> DataLoader:
    """Batches of (float32 images, int64 labels) tensors; `shuffle` and `augment` are seeded by `seed`.

    Augmentation is a random crop after padding by 2 (edge-replicated, i.e. the background for centred
    objects, whatever the normalisation) and a horizontal flip with probability 1/2, per sample.
    """
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

    if batch_size < 1:
        raise DataError(f"Batch size must be at least 1, got {batch_size}; pass a positive batch size.")
    tensors = TensorDataset(torch.from_numpy(ds.images), torch.from_numpy(ds.labels))
    sampler = (
        RandomSampler(tensors, generator=torch.Generator().manual_seed(seed))
        if shuffle
        else SequentialSampler(tensors)
    )
    # batch_size=None + a BatchSampler: the dataset is indexed once per batch, not once per sample.
    return DataLoader(
        tensors,
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
        collate_fn=PadCropFlip(CROP_PADDING, torch.Generator().manual_seed(seed + 1), ds.channels_last)
        if augment
        else _as_is,
    )


def _as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function that passes an already batched (images, labels) pair through."""
    return batch


@dataclass
class PadCropFlip:
    """Per-sample random crop after edge padding, then a random horizontal flip, on an [N,C,H,W] batch
    (or [N,H,W,C] when `channels_last`)."""

    padding: int
    generator: torch.Generator
    channels_last: bool = False

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        if self.channels_last:
            return self._augment(images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), labels
        return self._augment(images), labels

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        n, channels, height, width = images.shape
        pad = self.padding
        padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
        top = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=self.generator)
        rows = (top[:, None] + torch.arange(height))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width))[:, None, None, :]
        crops = padded[
            torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols
        ]
        flip = torch.rand(n, generator=self.generator) < 0.5
        return torch.where(flip[:, None, None, None], crops.flip(3), crops)
