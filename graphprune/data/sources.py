"""Dataset sources: Fashion-MNIST from the Debian package, .npz files, image folders (graphprune.data.folders),
synthetic patterns; the splits training reads, and the parts evaluation reads.

Every source returns an ArrayDataset of normalised float32 images. Integer images (npz, image files)
are standardised per channel with their own mean and std, or with the fixed values `image_norm` names
(graphprune.data.image_norm); float images in an npz, and synthetic ones, are taken as already
normalised. Fashion-MNIST's own statistics are its published mean 0.2860 and std 0.3530.
"""

from __future__ import annotations

import functools
import gzip
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphprune.data.dataset import ArrayDataset, ImageInput, seeded_indices
from graphprune.data.folders import (
    ImageFolder,
    load_image_folder,
    split_folder,
)
from graphprune.data.image_norm import OWN, OWN_STATISTICS, Normalization, parse_normalization
from graphprune.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
SYNTHETIC_SIZES = {"train": 6000, "test": 1000}
SYNTHETIC_SHAPE = (1, 28, 28)
SYNTHETIC_PERIODS = (3.0, 4.2, 5.6, 7.5, 10.0)
# IDX type codes (the third magic byte) and their big-endian numpy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    limit: int | None = None,
    seed: int = 0,
    labels: bool = True,
    shape: ImageInput | None = None,
    image_norm: str | None = None,
) -> ArrayDataset:
    """Load "fashion-mnist", "synthetic[:N]", an .npz file or an image-folder tree as an ArrayDataset.

    `limit` keeps a seeded random subset of that many samples (in their original order); `seed` also
    seeds the synthetic generator.  With `labels` False, images without labels are accepted too (an
    .npz holding images only, a flat folder of images) and come back unlabelled.  `shape` (the model's
    image input) converts a folder's images to its 1 or 3 channels and fits them to its size (see
    fit_image), arrays being taken at their size; the images come channels-last for a channels-last
    input.  `image_norm` says how 8-bit images become inputs ("data", a preset or MEAN/STD: see
    graphprune.data.image_norm); None is "data" with a warning where 8-bit images get their own
    statistics (a model trained with fixed ones wants those).
    """
    normalization = _checked(split, limit, image_norm)
    path = Path(spec)
    if spec == "fashion-mnist":
        dataset = load_fashion_mnist(split, normalization).sample(limit, seed)
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        _taken_as_normalised(normalization, "synthetic images")
        dataset = synthetic(_synthetic_count(spec, split), split=split, seed=seed).sample(limit, seed)
    elif path.is_dir():
        dataset = load_image_folder(
            path, split, limit=limit, seed=seed, labels=labels, shape=shape, normalization=normalization
        )
    elif path.suffix == ".npz" and path.is_file():
        dataset = load_npz(path, split, labels=labels, normalization=normalization).sample(limit, seed)
    else:
        raise DataError(
            f"Dataset '{spec}' is neither 'fashion-mnist', 'synthetic[:N]', an existing .npz file nor a "
            "folder of class sub-folders; check the spelling or the path."
        )
    return _as_the_model_takes(dataset, spec, shape, image_norm)


def dataset_parts(
    spec: str,
    split: str = "test",
    *,
    limit: int | None = None,
    seed: int = 0,
    shape: ImageInput | None = None,
    image_norm: str | None = None,
) -> Iterator[ArrayDataset]:
    """load_dataset's labelled dataset in one part, except for an image folder too big to hold in
    memory decoded, which comes in parts of a quarter of the memory available each (its own statistics,
    where used, measured on a seeded sample of STATISTICS_SAMPLE images): what evaluation reads."""
    path = Path(spec)
    if not path.is_dir():
        yield load_dataset(spec, split, limit=limit, seed=seed, shape=shape, image_norm=image_norm)
        return
    normalization = _checked(split, limit, image_norm)
    folder = ImageFolder.scan(path, split, labels=True, limit=limit, seed=seed, shape=shape)
    if folder.fits(len(folder.files)):
        yield _as_the_model_takes(folder.dataset(folder.files, normalization), spec, shape, image_norm)
        return
    log.info("folder %s does not fit in memory decoded: read in parts", folder.root)
    for part in folder.chunks(normalization):
        yield _as_the_model_takes(part, spec, shape, image_norm)


def _checked(split: str, limit: int | None, image_norm: str | None) -> Normalization:
    """The normalisation `image_norm` names, once the split and limit are checked."""
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    if limit is not None and limit < 1:
        raise DataError(f"Dataset limit must be at least 1, got {limit}; pass a positive limit or none.")
    return parse_normalization(image_norm or OWN_STATISTICS)


def _as_the_model_takes(
    dataset: ArrayDataset, spec: str, shape: ImageInput | None, image_norm: str | None
) -> ArrayDataset:
    """The dataset laid out for the model's input, with a warning (once per spec) when its 8-bit images
    got their own statistics without being told to."""
    if image_norm is None and dataset.image_norm is not None and spec != "fashion-mnist":  # published
        _warn_own_statistics(spec, dataset.image_norm)
    return dataset.laid_out(shape is not None and shape.channels_last)


def load_splits(
    spec: str,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    shape: ImageInput | None = None,
    image_norm: str | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) splits of a dataset spec (see load_dataset), each optionally limited to a seeded
    subset; the test split's 8-bit images are normalised exactly as the training split's were (with
    the training split's statistics where those are used). A folder without a test/ sub-folder, or an
    .npz without x_test, has no test split: a seeded HOLDOUT_SHARE of it is held out as one (accuracy
    measured on the training images would flatter every model). A folder too big for memory is
    decoded to a temporary file instead (ImageFolder.on_disk)."""
    normalization = _checked("train", train_limit, image_norm)
    _checked("test", test_limit, image_norm)
    path = Path(spec)
    if path.is_dir():
        train, test = _folder_splits(path, normalization, train_limit, test_limit, seed, shape)
    elif _npz_without_test_split(path):
        whole = load_npz(path, "train", normalization=normalization)
        train_rows, test_rows = _held_out(spec, len(whole), seed, train_limit, test_limit)
        train, test = whole.subset(train_rows), whole.subset(test_rows)
    else:
        train = load_dataset(spec, "train", limit=train_limit, seed=seed, shape=shape, image_norm=image_norm)
        test_norm = train.image_norm or image_norm
        test = load_dataset(spec, "test", limit=test_limit, seed=seed, shape=shape, image_norm=test_norm)
        return train, test
    return _as_the_model_takes(train, spec, shape, image_norm), _as_the_model_takes(
        test, spec, shape, image_norm
    )


# The share of a dataset without a test split that load_splits holds out as one.
HOLDOUT_SHARE = 0.1


def _npz_without_test_split(path: Path) -> bool:
    """Whether `path` is an .npz holding neither x_test nor images_test (one that cannot be read is left
    to load_dataset to describe)."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return not {"x_test", "images_test"} & set(archive.files)
    except (OSError, ValueError):
        return False


def _folder_splits(
    path: Path,
    normalization: Normalization,
    train_limit: int | None,
    test_limit: int | None,
    seed: int,
    shape: ImageInput | None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """load_splits of an image folder: only the images kept are decoded (to disk when they do not fit
    in memory), the test split normalised as the training split was."""
    if split_folder(path, "test") is not None:
        train_folder = ImageFolder.scan(path, "train", labels=True, limit=train_limit, seed=seed, shape=shape)
        test_folder = ImageFolder.scan(path, "test", labels=True, limit=test_limit, seed=seed, shape=shape)
        train_files, test_files = train_folder.files, test_folder.files
    else:
        train_folder = test_folder = ImageFolder.scan(
            path, "train", labels=True, limit=None, seed=seed, shape=shape
        )
        train_rows, test_rows = _held_out(str(path), len(train_folder.files), seed, train_limit, test_limit)
        train_files = [train_folder.files[i] for i in train_rows]
        test_files = [train_folder.files[i] for i in test_rows]
    train = train_folder.training_set(train_files, normalization)
    assert train.image_norm is not None  # a folder's images are 8-bit
    return train, test_folder.training_set(test_files, parse_normalization(train.image_norm))


def _held_out(
    spec: str, count: int, seed: int, train_limit: int | None, test_limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) rows of `count` samples: a seeded HOLDOUT_SHARE (at least one) held out for
    testing, each part then cut to a seeded subset of its limit."""
    if count < 2:
        raise DataError(f"{spec} holds {count} sample; training and testing on it need at least 2.")
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(HOLDOUT_SHARE * count))
    log.warning(
        "%s has no test split: %d of its %d samples (seeded) are held out to test on", spec, held, count
    )
    rows = []
    for part, limit in ((order[held:], train_limit), (order[:held], test_limit)):
        chosen = seeded_indices(len(part), limit, seed)
        rows.append(np.sort(part if chosen is None else part[chosen]))
    return rows[0], rows[1]


_WARNED_OWN_STATISTICS: set[str] = set()


def _warn_own_statistics(spec: str, applied: str) -> None:
    """Say once per dataset spec that its 8-bit images were standardised with their own statistics."""
    if spec in _WARNED_OWN_STATISTICS:
        return
    _WARNED_OWN_STATISTICS.add(spec)
    log.warning(
        "%s: 8-bit images standardised with their own mean/std (%s); if the model was trained with fixed "
        "ones, give them: --image-norm imagenet (torchvision's), unit, signed, pixels, caffe or MEAN/STD",
        spec,
        applied,
    )


# Fashion-MNIST ---------------------------------------------------------------------------------------


def load_fashion_mnist(split: str = "train", normalization: Normalization = OWN) -> ArrayDataset:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes) from the Debian package files,
    normalised with its published statistics unless `normalization` fixes others."""
    folder = fashion_mnist_dir()
    prefix = FASHION_MNIST_PREFIX[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(
            f"Fashion-MNIST files in {folder} have shapes {images.shape} and {labels.shape}; reinstall them."
        )
    if normalization.own:
        normalization = parse_normalization(f"{FASHION_MNIST_MEAN}/{FASHION_MNIST_STD}")
    normalised, applied = normalization.apply(images[:, None], "fashion-mnist")
    return ArrayDataset(normalised, labels, 10, "fashion-mnist", applied)


def fashion_mnist_dir() -> Path:
    """The folder holding the Fashion-MNIST .gz files: the usual place, else where dpkg put them."""
    marker = "train-images-idx3-ubyte.gz"
    if (FASHION_MNIST_DIR / marker).is_file():
        return FASHION_MNIST_DIR
    for line in _dpkg_files(FASHION_MNIST_PACKAGE):
        path = Path(line.strip())
        if path.name == marker and path.is_file():
            return path.parent
    raise DataError(
        f"Fashion-MNIST was not found in {FASHION_MNIST_DIR} nor through dpkg; install it with "
        f"`apt-get install {FASHION_MNIST_PACKAGE}`."
    )


def _dpkg_files(package: str) -> list[str]:
    """Paths `dpkg -L` lists for an installed package (empty when dpkg or the package is missing)."""
    try:
        result = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return result.stdout.splitlines() if result.returncode == 0 else []


@functools.lru_cache(maxsize=4)
def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a read-only numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read IDX file {path} ({exc}); check the file or reinstall it.") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"File {path} is not an IDX file (bad magic number); point at an *-ubyte(.gz) file.")
    dtype = np.dtype(IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = (
        tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)) if len(data) >= header else ()
    )
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(dims) != ndim or len(data) != expected:
        raise DataError(
            f"IDX file {path} holds {len(data)} bytes, its header says {expected}; the file is damaged."
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


# Synthetic --------------------------------------------------------------------------------------------


def _synthetic_count(spec: str, split: str) -> int:
    """Sample count from "synthetic" (split default) or "synthetic:N"."""
    _, _, count = spec.partition(":")
    if not count:
        return SYNTHETIC_SIZES[split]
    if not count.isdigit() or int(count) < 1:
        raise DataError(
            f"Synthetic dataset size must be a positive integer, got '{count}'; write e.g. synthetic:2000."
        )
    return int(count)


def synthetic(count: int, *, split: str = "train", seed: int = 0) -> ArrayDataset:
    """A learnable 10-class set of 1x28x28 images: gratings under a randomly placed blob.

    Class k is a grating with period SYNTHETIC_PERIODS[k // 2] px, horizontal stripes for even k and
    vertical for odd k, so classes survive horizontal flips and small shifts (the training
    augmentation). Phase, amplitude, blob position and additive noise vary per sample: a small CNN
    separates the classes, a linear model on raw pixels cannot. Each image is standardised on its own.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    _, height, width = SYNTHETIC_SHAPE
    labels = rng.integers(0, 10, size=count)
    angle = (labels % 2) * (np.pi / 2)
    period = np.asarray(SYNTHETIC_PERIODS)[labels // 2]
    phase = rng.uniform(0, 2 * np.pi, size=count)
    amplitude = rng.uniform(0.6, 1.4, size=count)
    centre = rng.uniform(-4, 4, size=(count, 2))
    ys, xs = np.meshgrid(
        np.arange(height) - (height - 1) / 2, np.arange(width) - (width - 1) / 2, indexing="ij"
    )
    along = xs[None] * np.cos(angle)[:, None, None] + ys[None] * np.sin(angle)[:, None, None]
    grating = np.cos(2 * np.pi * along / period[:, None, None] + phase[:, None, None])
    distance2 = (ys[None] - centre[:, 0, None, None]) ** 2 + (xs[None] - centre[:, 1, None, None]) ** 2
    blob = np.exp(-distance2 / (2 * 7.0**2))
    images = amplitude[:, None, None] * blob * grating + rng.normal(0, 0.3, size=(count, height, width))
    images = (images - images.mean(axis=(1, 2), keepdims=True)) / images.std(axis=(1, 2), keepdims=True)
    return ArrayDataset(images[:, None], labels, 10, f"synthetic:{count}")


# Files ------------------------------------------------------------------------------------------------


def load_npz(
    path: Path, split: str = "train", *, labels: bool = True, normalization: Normalization = OWN
) -> ArrayDataset:
    """Arrays from an .npz: x_<split>/y_<split> if present, else x or images with y or labels.  With
    `labels` False the labels may be missing, and an archive holding one array under any other key (the
    model's input name, say) is taken as images.

    Images may be [N,H,W], [N,C,H,W] or [N,H,W,C] (C of 1 or 3); see the module docstring for scaling.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {path} as an .npz archive ({exc}); check the file.") from exc
    image_keys = (f"x_{split}", f"images_{split}", "x", "images")
    label_keys = (f"y_{split}", f"labels_{split}", "y", "labels")
    if not labels and len(arrays) == 1:
        image_keys += tuple(arrays)
    images = _to_nchw(_first(arrays, image_keys, path), path)
    applied = None
    if np.issubdtype(images.dtype, np.integer):
        images, applied = normalization.apply(images, str(path))
    else:
        _taken_as_normalised(normalization, f"{path}'s float images")
    if not labels and not arrays.keys() & set(label_keys):
        return ArrayDataset.unlabelled(images, path.stem, applied)
    targets = _first(arrays, label_keys, path)
    if not np.issubdtype(targets.dtype, np.integer) or targets.ndim != 1 or len(targets) == 0:
        raise DataError(
            f"Labels in {path} must be a non-empty 1-D integer array, got {targets.dtype} {targets.shape}."
        )
    return ArrayDataset(images, targets, int(targets.max()) + 1, path.stem, applied)


def _first(arrays: dict[str, np.ndarray], keys: tuple[str, ...], path: Path) -> np.ndarray:
    """The first array present under one of `keys`."""
    for key in keys:
        if key in arrays:
            return arrays[key]
    raise DataError(f"{path} has arrays {sorted(arrays)} but none of {', '.join(keys)}; rename the arrays.")


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """Images as [N,C,H,W] from [N,H,W], [N,C,H,W] or channels-last [N,H,W,C]."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4:
        return images
    raise DataError(
        f"Images in {path} have shape {images.shape}; store them as [N,H,W], [N,C,H,W] or [N,H,W,C]."
    )


def _taken_as_normalised(normalization: Normalization, what: str) -> None:
    """Say (at info level) that a fixed normalisation leaves float images as they are: a model's
    recorded normalisation applies to 8-bit data only, and float arrays come normalised."""
    if not normalization.own:
        log.info("%s are floats, taken as normalised: image norm %s not applied", what, normalization.text)


def load_calibration(
    source: ArrayDataset | str,
    samples: int | None = None,
    seed: int = 0,
    shape: ImageInput | None = None,
    image_norm: str | None = None,
) -> ArrayDataset:
    """Calibration images: a seeded subset of `samples` from a dataset spec's training split (see
    load_dataset, `shape` and `image_norm` included; labels optional) or from an ArrayDataset (laid out
    as `shape` says)."""
    if isinstance(source, str):
        return load_dataset(
            source, "train", limit=samples, seed=seed, labels=False, shape=shape, image_norm=image_norm
        )
    if image_norm is not None:
        raise DataError(
            f"image_norm={image_norm!r} applies to a dataset spec; images given as an ArrayDataset are "
            "already normalised."
        )
    return source.sample(samples, seed).laid_out(shape is not None and shape.channels_last)
