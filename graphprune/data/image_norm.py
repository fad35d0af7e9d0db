"""How 8-bit images become model inputs (`--image-norm`): standardised with the data's own per-channel
statistics (the default), or (pixel / 255 - mean) / std with the fixed values the model was trained with.

Presets: "imagenet" (torchvision's pretrained classifiers), "unit" (pixels / 255, in [0, 1]: ultralytics
and many Keras models), "signed" ([-1, 1]: Keras MobileNet / Inception preprocessing) and "pixels"
(0..255 as they are: Keras models that rescale inside the graph), "caffe" (channels in BGR order, the
ImageNet mean subtracted on the 0..255 scale: Keras ResNet50 / VGG). Any other normalisation is written
MEAN/STD on the 0..1 scale, as torchvision's Normalize takes it: "0.5/0.25", or one value per channel,
"0.485,0.456,0.406/0.229,0.224,0.225".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from graphprune.errors import DataError

OWN_STATISTICS = "data"
PIXEL_MAX = 255


@dataclass(frozen=True)
class Normalization:
    """Fixed per-channel `mean` and `std` on the 0..1 pixel scale (one value, or one per channel), or
    both None for the data's own statistics; with `bgr` the channels are reversed first (RGB to BGR)."""

    text: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False

    @property
    def own(self) -> bool:
        """Whether the images are standardised with their own statistics."""
        return self.mean is None

    def resolved(self, images: np.ndarray) -> Normalization:
        """The fixed normalisation these [N,C,H,W] pixels (0..255 scale) get: the data's own per-channel
        statistics measured (a channel of one value gets std 1/255), else this one."""
        if not self.own:
            return self
        total = np.zeros(images.shape[1])
        squares = np.zeros(images.shape[1])
        for part in _parts(images):
            scaled = part / float(PIXEL_MAX)  # float64: sums of millions of pixels stay exact enough
            total += scaled.sum(axis=(0, 2, 3))
            squares += np.square(scaled).sum(axis=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0 / PIXEL_MAX)
        text = f"{','.join(f'{m:.6g}' for m in mean)}/{','.join(f'{s:.6g}' for s in std)}"
        return Normalization(text, tuple(mean.tolist()), tuple(std.tolist()))

    def apply(self, images: np.ndarray, source: str) -> tuple[np.ndarray, str]:
        """Integer [N,C,H,W] images as float32 model inputs, and the MEAN/STD they got (own statistics
        measured: see `resolved`); `source` names the data in errors.  Fixed statistics need 8-bit
        pixels and one value or one per channel.  Worked in parts: the peak is the integer images and
        the float32 result (IMAGE_BYTES_PER_PIXEL per uint8 element)."""
        if not self.own and images.size and (images.min() < 0 or images.max() > PIXEL_MAX):
            raise DataError(
                f"{source} holds integers from {images.min()} to {images.max()}; --image-norm "
                f"{self.text} is for 8-bit pixels (0..{PIXEL_MAX}): store them as such, or use "
                f"--image-norm {OWN_STATISTICS}."
            )
        fixed = self.resolved(images)
        assert fixed.mean is not None and fixed.std is not None
        channels = images.shape[1]
        if {len(fixed.mean), len(fixed.std)} - {1, channels}:
            raise DataError(
                f"--image-norm {self.text} gives {len(fixed.mean)} mean(s) and {len(fixed.std)} std(s), "
                f"but {source} has {channels} channel(s); give one value or one per channel."
            )
        mean = np.asarray(fixed.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(fixed.std, np.float32).reshape(1, -1, 1, 1)
        normalised = np.empty(images.shape, np.float32)
        start = 0
        for part in _parts(images[:, ::-1] if fixed.bgr else images):
            normalised[start : start + len(part)] = (part / np.float32(PIXEL_MAX) - mean) / std
            start += len(part)
        return normalised, fixed.text


# Elements per step of the normalisation: its float temporaries stay tens of MB whatever the data.
PART_ELEMENTS = 1 << 22
# Peak bytes per uint8 image element while a set is normalised: the pixels and the float32 result.
IMAGE_BYTES_PER_PIXEL = 1 + 4


def _parts(images: np.ndarray) -> list[np.ndarray]:
    """Consecutive slices of the images along N, of about PART_ELEMENTS elements each (at least one image)."""
    step = max(1, PART_ELEMENTS // max(1, images[0].size if len(images) else 1))
    return [images[start : start + step] for start in range(0, len(images), step)]


OWN = Normalization(OWN_STATISTICS)
PRESETS = {
    preset.text: preset
    for preset in (
        Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        Normalization("unit", (0.0,), (1.0,)),
        Normalization("signed", (0.5,), (0.5,)),
        Normalization("pixels", (0.0,), (1.0 / PIXEL_MAX,)),
        # Keras' "caffe" preprocessing: BGR, the ImageNet means 103.939, 116.779, 123.68 subtracted
        Normalization(
            "caffe", (103.939 / PIXEL_MAX, 116.779 / PIXEL_MAX, 123.68 / PIXEL_MAX), (1.0 / PIXEL_MAX,), True
        ),
    )
}
NORMALIZE_CHOICES = (OWN_STATISTICS, *PRESETS)


@functools.lru_cache(maxsize=16)
def parse_normalization(text: str) -> Normalization:
    """A Normalization from "data", a preset name or MEAN/STD (see the module docstring)."""
    if text == OWN_STATISTICS:
        return OWN
    if text in PRESETS:
        return PRESETS[text]
    mean_text, slash, std_text = text.partition("/")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        mean = std = ()
    if not slash or not mean or not std or not all(np.isfinite(mean + std)) or min(std) <= 0:
        raise DataError(
            f"image normalisation {text!r} is neither {', '.join(NORMALIZE_CHOICES)} nor MEAN/STD with "
            "positive std (e.g. 0.5/0.25 or 0.485,0.456,0.406/0.229,0.224,0.225); give one with "
            "--image-norm (it also overrides one a model records)."
        )
    return Normalization(text, mean, std)
