"""Image folders: listing a folder tree (one class per sub-folder, train/ and test/ or val/ splits),
decoding and fitting its images to a model's input as torchvision evaluates, normalising them in parts,
and holding them in memory, in parts (evaluation) or on disk (training sets larger than memory)."""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphprune.data.dataset import ArrayDataset, ImageInput, seeded_indices
from graphprune.data.image_norm import IMAGE_BYTES_PER_PIXEL, OWN, Normalization
from graphprune.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})

# Sub-folders that hold a split of an image folder, first found wins (ImageNet's is val/).
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}


def split_folder(root: Path, split: str) -> Path | None:
    """The sub-folder of `root` holding `split` (SPLIT_FOLDERS), None when there is none."""
    return next((root / name for name in SPLIT_FOLDERS[split] if (root / name).is_dir()), None)


def load_image_folder(
    root: Path,
    split: str = "train",
    *,
    limit: int | None = None,
    seed: int = 0,
    labels: bool = True,
    shape: ImageInput | None = None,
    normalization: Normalization = OWN,
) -> ArrayDataset:
    """Images under root/<class>/ (or root/<split>/<class>/ when that exists: train/, and test/, val/ or
    validation/ for the test split), one label per sub-folder; with `labels` False, a flat folder of
    images is read unlabelled.

    With `shape` (the model's image input) the images become grayscale for 1 channel, RGB otherwise, and
    are fitted to its size (fit_image); without, grayscale if every file is grayscale, RGB otherwise, and
    fitted to their most common size. With `limit` only the chosen files are decoded. A folder that
    would not fit in memory decoded is refused (evaluation reads one in parts, training from disk:
    graphprune.data.sources.dataset_parts and load_splits).
    """
    folder = ImageFolder.scan(root, split, labels=labels, limit=limit, seed=seed, shape=shape)
    folder.check_fits(len(folder.files))
    return folder.dataset(folder.files, normalization)


@dataclass
class ImageFolder:
    """The image files of a folder tree, (path, label) in order (label -1 in a flat folder), and how
    they decode: grayscale or RGB, fitted to (height, width)."""

    root: Path
    name: str
    files: list[tuple[Path, int]]
    classes: list[str]
    gray: bool
    size: tuple[int, int]
    channels_last: bool = False

    @classmethod
    def scan(
        cls,
        root: Path,
        split: str,
        *,
        labels: bool,
        limit: int | None,
        seed: int,
        shape: ImageInput | None,
    ) -> ImageFolder:
        """List the folder (see load_image_folder), keep a seeded subset of `limit` files, and read every
        kept file's header for its mode and size."""

        name = root.name  # the dataset's, not its split folder's
        split_root = split_folder(root, split)
        if split_root is None and split_folder(root, "train") is not None:
            raise DataError(
                f"Folder {root} has {SPLIT_FOLDERS['train'][0]}/ but no {split} split "
                f"({' or '.join(f'{name}/' for name in SPLIT_FOLDERS[split])}); add one, or read the "
                "train split."
            )
        root = split_root or root
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = [
            (path, label)
            for label, folder in enumerate(classes)
            for path in sorted((root / folder).iterdir())
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files and not labels:  # a flat folder of images
            files = [(path, -1) for path in sorted(root.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(
                f"Folder {root} has no images in class sub-folders; lay it out as {root}/<class>/<image>"
                + (" (or, for calibration, put the images in it directly)." if not labels else ".")
            )
        chosen = seeded_indices(len(files), limit, seed)
        if chosen is not None:
            files = [files[i] for i in chosen]
        headers = []
        for path, _ in files:
            with _readable(path) as image:
                headers.append((image.mode, image.size))
        if shape is not None:
            gray, size = shape.channels == 1, (shape.height, shape.width)
        else:  # grayscale if every file is, at the most common size
            width, height = Counter(wh for _, wh in headers).most_common(1)[0][0]
            gray, size = all(mode in GRAY_MODES for mode, _ in headers), (height, width)
        channels_last = shape is not None and shape.channels_last
        return cls(root, name, files, classes if files[0][1] >= 0 else [], gray, size, channels_last)

    def decoded_bytes(self, count: int) -> int:
        """Memory that decoding, normalising and laying out `count` of the images takes at its peak."""
        per_element = FOLDER_BYTES_PER_ELEMENT + (
            CHANNELS_LAST_BYTES_PER_ELEMENT if self.channels_last else 0
        )
        return count * (1 if self.gray else 3) * self.size[0] * self.size[1] * per_element

    def pixels(self, files: list[tuple[Path, int]]) -> np.ndarray:
        """The files decoded and fitted: uint8 [N, C, H, W], written in place (one byte per element)."""
        pixels = np.empty((len(files), 1 if self.gray else 3, *self.size), np.uint8)
        for index, (path, _) in enumerate(files):
            with _readable(path) as image:
                fitted = np.asarray(fit_image(image.convert("L" if self.gray else "RGB"), self.size))
            pixels[index] = fitted[None] if self.gray else fitted.transpose(2, 0, 1)
        return pixels

    def dataset(self, files: list[tuple[Path, int]], normalization: Normalization) -> ArrayDataset:
        """The files as a normalised dataset (unlabelled for a flat folder)."""
        normalised, applied = normalization.apply(self.pixels(files), f"folder {self.root}")
        return self._labelled(normalised, files, applied)

    def _labelled(
        self, images: np.ndarray, files: list[tuple[Path, int]], applied: str, channels_last: bool = False
    ) -> ArrayDataset:
        """A dataset of the files' images (unlabelled for a flat folder)."""
        labels = np.array([label for _, label in files]) if self.classes else np.full(len(files), -1)
        return ArrayDataset(images, labels, len(self.classes), self.name, applied, channels_last)

    def fits(self, count: int) -> bool:
        """Whether `count` of the images fit in the memory available, decoded (see decoded_bytes)."""
        free = available_memory()
        return free is None or self.decoded_bytes(count) <= free

    def check_fits(self, count: int) -> None:
        """Refuse, before decoding, `count` of the images that would not fit in memory (a folder loaded
        whole is held in memory whole): an out-of-memory kill says nothing."""
        if not self.fits(count):
            raise DataError(
                f"Folder {self.root} would take about {self.decoded_bytes(count) / 2**30:.1f} GiB decoded, "
                f"more than the {(available_memory() or 0) / 2**30:.1f} GiB of memory available (its images "
                "are held in memory whole); draw a seeded subset (--limit, --train-limit / --val-limit, "
                "--calib-samples) or use fewer images."
            )

    def part_size(self) -> int:
        """Images per part when the folder is read in parts: a quarter of the memory available."""
        return max(1, (available_memory() or 0) // 4 // self.decoded_bytes(1))

    def training_set(self, files: list[tuple[Path, int]], normalization: Normalization) -> ArrayDataset:
        """The files as a dataset in memory, or on disk (see `on_disk`) when they would not fit."""
        if self.fits(len(files)):
            return self.dataset(files, normalization)
        return self.on_disk(files, normalization)

    def fixed(self, normalization: Normalization, files: list[tuple[Path, int]]) -> Normalization:
        """The normalisation as fixed values: the data's own statistics measured on a seeded sample of
        STATISTICS_SAMPLE of `files` (what a folder read in parts is normalised with)."""
        if not normalization.own:
            return normalization
        sample = seeded_indices(len(files), STATISTICS_SAMPLE, 0)
        return normalization.resolved(self.pixels(files if sample is None else [files[i] for i in sample]))

    def chunks(self, normalization: Normalization) -> Iterator[ArrayDataset]:
        """The images in order, as datasets of `part_size` images each, all normalised alike (see
        `fixed`)."""
        normalization = self.fixed(normalization, self.files)
        step = self.part_size()
        for start in range(0, len(self.files), step):
            yield self.dataset(self.files[start : start + step], normalization)

    def on_disk(self, files: list[tuple[Path, int]], normalization: Normalization) -> ArrayDataset:
        """The files as a normalised dataset whose images live in a float32 file (np.memmap) in a
        temporary folder removed at exit, written in parts (see `fixed`) and already laid out as the
        model takes them: for training sets larger than memory. Under torchrun the processes of a
        machine share one file: local rank 0 writes it, the others wait for it (spill_folder)."""
        normalization = self.fixed(normalization, files)
        channels = 1 if self.gray else 3
        shape = (
            (len(files), *self.size, channels) if self.channels_last else (len(files), channels, *self.size)
        )
        key = repr((str(self.root), [str(path) for path, _ in files], shape, normalization.text))
        folder, writer = spill_folder(hashlib.sha256(key.encode()).hexdigest()[:16])
        path = folder / "images.f32"
        if writer:
            self._write(path, files, normalization, shape)
        else:
            _wait_for(path, self.root)
        images = np.memmap(path, np.float32, "c", shape=shape)  # copy-on-write: the file stays as written
        return self._labelled(images, files, normalization.text, self.channels_last)

    def _write(
        self,
        path: Path,
        files: list[tuple[Path, int]],
        normalization: Normalization,
        shape: tuple[int, ...],
    ) -> None:
        """Decode, normalise and lay out the files into `path` in parts (under another name until done)."""
        need = int(np.prod(shape)) * 4
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise DataError(
                f"Folder {self.root} takes {need / 2**30:.1f} GiB as float32, more than the memory and the "
                f"{free / 2**30:.1f} GiB free in {path.parent.parent}; draw a seeded subset (--train-limit "
                "/ --val-limit) or set TMPDIR to a larger disk."
            )
        log.warning(
            "folder %s does not fit in memory: decoded to %s (%.1f GiB)", self.root, path, need / 2**30
        )
        partial = path.with_suffix(".partial")
        images = np.memmap(partial, np.float32, "w+", shape=shape)
        step = self.part_size()
        for start in range(0, len(files), step):
            part, _ = normalization.apply(self.pixels(files[start : start + step]), f"folder {self.root}")
            images[start : start + len(part)] = part.transpose(0, 2, 3, 1) if self.channels_last else part
        images.flush()
        os.replace(partial, path)


# How long a process waits for local rank 0 to decode a shared training folder (seconds).
SPILL_WAIT_S = 3600.0


def spill_folder(key: str) -> tuple[Path, bool]:
    """The temporary folder a training set larger than memory is decoded into, and whether this
    process writes it: its own folder, or under torchrun (TORCHELASTIC_RUN_ID, LOCAL_RANK) one per run
    and data `key` that local rank 0 writes and removes at exit."""
    run, rank = os.environ.get("TORCHELASTIC_RUN_ID"), os.environ.get("LOCAL_RANK")
    if run is None or rank is None:
        folder = Path(tempfile.mkdtemp(prefix="graphprune-data-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder, True
    folder = Path(tempfile.gettempdir()) / f"graphprune-data-{run}-{key}"
    writer = rank == "0"
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder, writer


def _wait_for(path: Path, root: Path) -> None:
    """Wait until local rank 0 has written `path` (SPILL_WAIT_S at most)."""
    log.info("waiting for local rank 0 to decode %s to %s", root, path)
    deadline = time.monotonic() + SPILL_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"local rank 0 did not decode {root} to {path} within {SPILL_WAIT_S:.0f} s; see its error."
            )
        time.sleep(0.5)


@contextmanager
def _readable(path: Path) -> Iterator[Image.Image]:
    """The image file opened; a file that cannot be read or decoded (truncated, not an image) is one
    DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            yield image
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated data are OSErrors
        raise DataError(f"Cannot read the image {path} ({exc}); remove or fix the file.") from exc


# A folder read in parts measures its own statistics on this many images (seeded).
STATISTICS_SAMPLE = 1024


# Bytes per image element while a folder is decoded and normalised: the uint8 pixels and the float32
# result (graphprune.data.image_norm works in parts); a channels-last model's data also takes the
# float32 result's transposed copy.
FOLDER_BYTES_PER_ELEMENT = IMAGE_BYTES_PER_PIXEL
CHANNELS_LAST_BYTES_PER_ELEMENT = 4


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# The share of the resized image a centre crop keeps (torchvision's evaluation transform: 224 of 256).
CROP_SHARE = 0.875


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An image at (height, width) `size`: as it is when it already has that size, else resized
    (bilinear, aspect kept) so that the crop keeps CROP_SHARE of its shorter side, and centre-cropped,
    as torchvision's models are evaluated (a 500x375 photo for a 224x224 input: 341x256, then 224x224)."""
    from PIL import Image

    height, width = size
    if image.size == (width, height):
        return image
    scale = max(height, width) / CROP_SHARE / min(image.size)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
