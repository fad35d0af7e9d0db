"""Datasets: Fashion-MNIST, synthetic, .npz and image folders as ArrayDatasets, and the torch loader."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from graphprune.data import ArrayDataset, folders, load_dataset, sources, torch_loader
from graphprune.data.dataset import ImageInput
from graphprune.data.folders import fit_image
from graphprune.data.image_norm import parse_normalization
from graphprune.errors import DataError


def _fashion_installed() -> bool:
    try:
        sources.fashion_mnist_dir()
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _fashion_installed(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_shapes_and_normalisation() -> None:
    train = load_dataset("fashion-mnist")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int64
    assert train.num_classes == 10 and np.array_equal(np.bincount(train.labels), np.full(10, 6000))
    assert abs(float(train.images.mean())) < 0.01 and abs(float(train.images.std()) - 1.0) < 0.01
    small = load_dataset("fashion-mnist", "test", limit=50, seed=3)
    assert len(small) == 50
    assert np.array_equal(small.images, load_dataset("fashion-mnist", "test", limit=50, seed=3).images)
    assert not np.array_equal(small.labels, load_dataset("fashion-mnist", "test", limit=50, seed=4).labels)


def test_fashion_mnist_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(sources, "_dpkg_files", lambda package: [])
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_fashion_mnist_found_through_dpkg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for prefix in ("train", "t10k"):
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz",
            np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.array([3, 7], dtype=np.uint8))
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "missing")
    monkeypatch.setattr(
        sources, "_dpkg_files", lambda package: ["/.", str(folder / "train-images-idx3-ubyte.gz")]
    )
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (2, 1, 28, 28) and ds.labels.tolist() == [3, 7]
    expected = (np.arange(28 * 28) % 256 / 255.0 - sources.FASHION_MNIST_MEAN) / sources.FASHION_MNIST_STD
    np.testing.assert_allclose(ds.images[0, 0].ravel(), expected, rtol=1e-5)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def test_damaged_idx_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 0x08, 1]) + np.array([10], dtype=">u4").tobytes() + b"\x01\x02")
    with pytest.raises(DataError, match="damaged"):
        sources.read_idx(path)
    path.write_bytes(b"not gzip at all")
    sources.read_idx.cache_clear()
    with pytest.raises(DataError):
        sources.read_idx(path)


def test_synthetic_is_deterministic_and_balanced() -> None:
    a = load_dataset("synthetic:500")
    b = load_dataset("synthetic:500")
    assert a.images.shape == (500, 1, 28, 28) and a.num_classes == 10
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, load_dataset("synthetic:500", seed=1).images)
    assert not np.array_equal(a.images, load_dataset("synthetic:500", "test").images)
    assert set(a.labels.tolist()) == set(range(10))
    np.testing.assert_allclose(a.images.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    assert len(load_dataset("synthetic")) == 6000 and len(load_dataset("synthetic", "test")) == 1000
    assert len(load_dataset("synthetic", limit=10)) == 10
    with pytest.raises(DataError, match="synthetic:2000"):
        load_dataset("synthetic:lots")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one thread: on a shared 2-core machine torch's thread pool mostly waits for the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_synthetic_is_learnable_by_a_small_cnn_not_by_a_linear_model() -> None:
    torch.manual_seed(0)
    train, test = load_dataset("synthetic:2000"), load_dataset("synthetic:500", "test")
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for epoch in range(3):
        for x, y in torch_loader(train, 64, shuffle=True, augment=True, seed=epoch):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test.images)).argmax(1).numpy() == test.labels).mean()
    assert accuracy > 0.8
    flat = np.c_[train.images.reshape(len(train), -1), np.ones(len(train))]
    weights = np.linalg.lstsq(flat, np.eye(10)[train.labels], rcond=None)[0]
    linear = np.argmax(np.c_[test.images.reshape(len(test), -1), np.ones(len(test))] @ weights, 1)
    assert (linear == test.labels).mean() < 0.3


def test_npz_round_trip(tmp_path: Path) -> None:
    original = load_dataset("synthetic:40")
    path = tmp_path / "data.npz"
    np.savez(path, images=original.images, labels=original.labels)
    loaded = load_dataset(str(path))
    assert np.array_equal(loaded.images, original.images) and np.array_equal(loaded.labels, original.labels)
    assert loaded.num_classes == int(original.labels.max()) + 1 and loaded.name == "data"


def test_npz_uint8_channels_last_with_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    x_train = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(path, x_train=x_train, y_train=np.arange(20) % 4, x_test=x_test, y_test=np.arange(5) % 4)
    train = load_dataset(str(path))
    test = load_dataset(str(path), "test")
    assert train.images.shape == (20, 3, 8, 8) and test.images.shape == (5, 3, 8, 8)
    np.testing.assert_allclose(train.images.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.images.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        np.corrcoef(train.images[:, 1].ravel(), x_train[..., 1].ravel())[0, 1], 1.0, atol=1e-6
    )
    np.savez(tmp_path / "bad.npz", pixels=x_train)
    with pytest.raises(DataError, match="pixels"):
        load_dataset(str(tmp_path / "bad.npz"))


def _write_images(root: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    for label, images in arrays.items():
        (root / label).mkdir(parents=True)
        for index, array in enumerate(images):
            Image.fromarray(array).save(root / label / f"{index:03d}.png")


def test_image_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        name: [rng.integers(0, 256, size=(12, 10), dtype=np.uint8) for _ in range(3)]
        for name in ("cat", "dog")
    }
    _write_images(tmp_path / "pets", arrays)
    ds = load_dataset(str(tmp_path / "pets"))
    assert ds.images.shape == (6, 1, 12, 10) and ds.num_classes == 2 and ds.name == "pets"
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    raw = np.stack(arrays["cat"] + arrays["dog"]).astype(np.float32)
    np.testing.assert_allclose(ds.images[:, 0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
    assert len(load_dataset(str(tmp_path / "pets"), limit=4)) == 4


def test_image_folder_mixed_modes_sizes_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "set"
    _write_images(root / "train", {"a": [rng.integers(0, 256, size=(8, 8), dtype=np.uint8)] * 2})
    _write_images(
        root / "train",
        {
            "b": [
                rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
                rng.integers(0, 256, size=(16, 4, 3), dtype=np.uint8),
            ]
        },
    )
    _write_images(root / "test", {"a": [rng.integers(0, 256, size=(8, 8), dtype=np.uint8)]})
    train = load_dataset(str(root))
    assert train.images.shape == (4, 3, 8, 8)  # one RGB file makes all RGB; the odd size is resized
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert load_dataset(str(root), "test").images.shape == (1, 1, 8, 8)


def test_a_folder_is_fitted_to_the_models_input_as_torchvision_evaluates() -> None:
    """Resized with its aspect kept so that the crop keeps 0.875 of the shorter side, then centre-cropped:
    a 500x375 photo becomes 341x256 and its middle 224x224; an image at the size stays as it is."""
    photo = np.zeros((375, 500), dtype=np.uint8)
    photo[:, 80:420] = 255  # bright where the 224 crop of the 341-wide resize falls (x 58..282 of 341)
    fitted = fit_image(Image.fromarray(photo), (224, 224))
    assert fitted.size == (224, 224) and np.asarray(fitted).min() == 255
    assert fit_image(Image.fromarray(photo), (375, 500)).size == (500, 375)
    tall = fit_image(Image.fromarray(np.zeros((300, 100), dtype=np.uint8)), (32, 48))
    assert tall.size == (48, 32)


def test_image_folder_of_mixed_sizes_fits_a_given_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    sizes = [(40, 36, 3), (28, 28, 3), (64, 30, 3)]
    _write_images(root / "test", {"a": [rng.integers(0, 256, size=s, dtype=np.uint8) for s in sizes]})
    fitted = load_dataset(str(root), "test", shape=ImageInput(3, 28, 28))
    assert fitted.images.shape == (3, 3, 28, 28) and fitted.name == "photos"
    assert load_dataset(str(root), "test", shape=ImageInput(1, 20, 24)).images.shape == (3, 1, 20, 24)  # gray
    assert load_dataset(str(root), "test").images.shape == (3, 3, 40, 36)  # no size: the first, most common


def test_bad_specs_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic", "validation")
    with pytest.raises(DataError, match="limit"):
        load_dataset("synthetic", limit=0)
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(DataError):
        load_dataset(str(tmp_path / "broken.npz"))


def test_array_dataset_batches_and_split() -> None:
    ds = ArrayDataset(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), np.arange(10) % 3, 3, "toy")
    assert len(ds) == 10 and ds.sample_shape == (1, 1, 1)
    ordered = list(ds.batches(4))
    assert [len(y) for _, y in ordered] == [4, 4, 2]
    assert np.concatenate([x for x, _ in ordered]).ravel().tolist() == list(range(10))
    shuffled = np.concatenate([x for x, _ in ds.batches(3, shuffle=True, seed=5)]).ravel()
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    again = np.concatenate([x for x, _ in ds.batches(3, shuffle=True, seed=5)]).ravel()
    assert np.array_equal(shuffled, again)
    first, rest = ds.split(0.7, seed=1)
    assert (len(first), len(rest)) == (7, 3)
    assert sorted(first.images.ravel().tolist() + rest.images.ravel().tolist()) == list(range(10))
    with pytest.raises(DataError):
        ds.split(1.0)
    with pytest.raises(DataError, match="labels"):
        ArrayDataset(np.zeros((2, 1, 1, 1)), np.array([0, 5]), 3, "bad")
    with pytest.raises(DataError, match=r"\[N,C,H,W\]"):
        ArrayDataset(np.zeros((2, 4)), np.array([0, 1]), 3, "bad")


def test_torch_loader_plain_and_shuffled() -> None:
    ds = load_dataset("synthetic:50")
    plain = list(torch_loader(ds, 16))
    assert [tuple(x.shape) for x, _ in plain] == [(16, 1, 28, 28)] * 3 + [(2, 1, 28, 28)]
    assert plain[0][0].dtype == torch.float32 and plain[0][1].dtype == torch.int64
    assert np.array_equal(torch.cat([x for x, _ in plain]).numpy(), ds.images)
    first = torch.cat([y for _, y in torch_loader(ds, 16, shuffle=True, seed=2)])
    second = torch.cat([y for _, y in torch_loader(ds, 16, shuffle=True, seed=2)])
    assert torch.equal(first, second) and sorted(first.tolist()) == sorted(ds.labels.tolist())


def test_torch_loader_augmentation_is_pad_crop_flip() -> None:
    ds = load_dataset("synthetic:32")
    (x, y), *_ = list(torch_loader(ds, 32, augment=True, seed=0))
    assert x.shape == (32, 1, 28, 28) and np.array_equal(y.numpy(), ds.labels)
    padded = nn.functional.pad(torch.from_numpy(ds.images), (2, 2, 2, 2), mode="replicate")
    changed = 0
    for i in range(32):
        candidates = [
            crop
            for top in range(5)
            for left in range(5)
            for crop in (padded[i, :, top : top + 28, left : left + 28],)
            for crop in (crop, crop.flip(2))
        ]
        assert any(torch.equal(x[i], c) for c in candidates)
        changed += not torch.equal(x[i], torch.from_numpy(ds.images[i]))
    assert changed > 16
    assert torch.equal(x, next(iter(torch_loader(ds, 32, augment=True, seed=0)))[0])


def test_torch_loader_flips_horizontally_about_half_the_images() -> None:
    """Noise images (no symmetry): each augmented image is one crop, flipped along width or not."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((64, 2, 12, 10)).astype(np.float32)
    ds = ArrayDataset(images, np.zeros(64, np.int64), 1, "noise")
    (x, _), *_ = list(torch_loader(ds, 64, augment=True, seed=3))
    padded = nn.functional.pad(torch.from_numpy(images), (2, 2, 2, 2), mode="replicate")
    flipped = []
    for i in range(64):
        crops = [padded[i, :, top : top + 12, left : left + 10] for top in range(5) for left in range(5)]
        horizontal = any(torch.equal(x[i], crop.flip(2)) for crop in crops)
        assert horizontal or any(torch.equal(x[i], crop) for crop in crops)
        assert not any(torch.equal(x[i], crop.flip(1)) for crop in crops)  # never upside down
        flipped.append(horizontal)
    assert 16 <= sum(flipped) <= 48


def test_numpy_side_does_not_import_torch() -> None:
    code = (
        "import sys, graphprune.data as d; d.load_dataset('synthetic:8'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        (["N", 3, 224, 200], ImageInput(3, 224, 200)),
        ([1, 1, 28, 28], ImageInput(1, 28, 28)),
        (["N", 224, 200, 3], ImageInput(3, 224, 200, channels_last=True)),  # Keras through tf2onnx
        (["N", 3, "H", "W"], None),  # no size to fit to
        (["N", "H", "W", 3], None),
        (["N", 3, 224], None),
    ],
)
def test_the_shape_a_folder_is_fitted_to_comes_from_an_image_input(dims, expected) -> None:  # noqa: ANN001
    from onnx import TensorProto, helper

    from graphprune.runtime.shapes import image_shape

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    assert image_shape(model) == expected


def test_a_folder_too_big_for_memory_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A folder is decoded into memory whole: one that would not fit is one clear error, not an OOM kill;
    a subset that fits loads."""
    rng = np.random.default_rng(4)
    _write_images(tmp_path / "big", {"a": [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)] * 4})
    real = folders.available_memory()
    assert real is None or real > 2**20  # read from /proc/meminfo on Linux
    per_image = 3 * 16 * 16 * folders.FOLDER_BYTES_PER_ELEMENT
    monkeypatch.setattr(folders, "available_memory", lambda: 3 * per_image)
    with pytest.raises(DataError, match=r"more than the 0.0 GiB of memory available.*--limit"):
        load_dataset(str(tmp_path / "big"))
    assert len(load_dataset(str(tmp_path / "big"), limit=3)) == 3


# Image normalisation (--image-norm) -------------------------------------------------------------------


def _two_level_folder(root: Path) -> Path:
    """RGB images of pixel (0, 128, 255) under train/ and of (255, 255, 255) under test/."""
    _write_images(root / "train", {"a": [np.full((4, 4, 3), (0, 128, 255), dtype=np.uint8)] * 2})
    _write_images(root / "test", {"a": [np.full((4, 4, 3), 255, dtype=np.uint8)]})
    return root


@pytest.mark.parametrize(
    ("image_norm", "expected"),
    [
        ("imagenet", [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225]),
        ("unit", [0.0, 128 / 255, 1.0]),
        ("signed", [-1.0, 128 / 255 * 2 - 1, 1.0]),
        ("pixels", [0.0, 128.0, 255.0]),
        ("0.5/0.25", [-2.0, (128 / 255 - 0.5) / 0.25, 2.0]),
        ("caffe", [255 - 103.939, 128 - 116.779, 0 - 123.68]),  # BGR, the mean subtracted
        ("0.1,0.2,0.3/0.5,0.5,0.5", [-0.2, (128 / 255 - 0.2) / 0.5, 1.4]),
    ],
)
def test_fixed_image_norms_are_applied_to_8_bit_images(tmp_path: Path, image_norm: str, expected) -> None:  # noqa: ANN001
    ds = load_dataset(str(_two_level_folder(tmp_path / "set")), image_norm=image_norm)
    np.testing.assert_allclose(ds.images[0, :, 0, 0], expected, rtol=1e-5, atol=1e-4)
    assert ds.image_norm == image_norm  # what a trained model records


def test_own_statistics_are_measured_on_the_training_split_and_reused_for_the_test_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from graphprune.data import load_splits

    root = tmp_path / "set"
    _write_images(root / "train", {"a": [np.full((4, 4), v, dtype=np.uint8) for v in (50, 150)]})
    _write_images(root / "test", {"a": [np.full((4, 4), 250, dtype=np.uint8)]})
    train, test = load_splits(str(root), image_norm="data")
    np.testing.assert_allclose(train.images[:, 0, 0, 0], [-1.0, 1.0], atol=1e-5)  # own mean 100, std 50
    np.testing.assert_allclose(test.images[0, 0, 0, 0], 3.0, atol=1e-4)  # (250 - 100) / 50, not 0
    assert train.image_norm == test.image_norm == f"{100 / 255:.6g}/{50 / 255:.6g}"
    assert not caplog.records  # "data" given: no warning
    load_dataset(str(root))  # not given: the data's own statistics, said once
    load_dataset(str(root), limit=1)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(root)]
    assert "--image-norm" in caplog.records[0].getMessage()


def test_float_images_are_taken_as_normalised_whatever_the_image_norm(tmp_path: Path) -> None:
    original = load_dataset("synthetic:8")
    np.savez(tmp_path / "floats.npz", images=original.images, labels=original.labels)
    for spec in (str(tmp_path / "floats.npz"), "synthetic:8"):
        loaded = load_dataset(spec, image_norm="imagenet")
        assert np.array_equal(loaded.images, original.images) and loaded.image_norm is None


@pytest.mark.skipif(not _fashion_installed(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_is_normalised_with_its_published_statistics_unless_told() -> None:
    published = load_dataset("fashion-mnist", "test", limit=20)
    assert published.image_norm == f"{sources.FASHION_MNIST_MEAN}/{sources.FASHION_MNIST_STD}"
    assert np.array_equal(
        load_dataset("fashion-mnist", "test", limit=20, image_norm="data").images, published.images
    )
    unit = load_dataset("fashion-mnist", "test", limit=20, image_norm="unit").images
    np.testing.assert_allclose(
        unit, published.images * sources.FASHION_MNIST_STD + sources.FASHION_MNIST_MEAN, atol=1e-5
    )


def test_bad_image_norms_are_one_line_data_errors(tmp_path: Path) -> None:
    for text in ("imagenette", "0.5", "0.5/0", "a/b", "0.5/-1", "nan/1", "/0.5"):
        with pytest.raises(DataError, match="neither"):
            parse_normalization(text)
    root = _two_level_folder(tmp_path / "set")
    with pytest.raises(DataError, match="2 mean.*3 channel"):
        load_dataset(str(root), image_norm="0.1,0.2/0.3,0.4")
    np.savez(tmp_path / "wide.npz", x=np.full((2, 1, 4, 4), 1000, dtype=np.int32), y=np.array([0, 1]))
    with pytest.raises(DataError, match="from 1000 to 1000.*8-bit"):
        load_dataset(str(tmp_path / "wide.npz"), image_norm="unit")
    assert (
        load_dataset(str(tmp_path / "wide.npz"), image_norm="data").image_norm is not None
    )  # own stats: any range
    with pytest.raises(DataError, match="already normalised"):
        sources.load_calibration(load_dataset("synthetic:8"), image_norm="unit")


# Channels-last models (Keras through tf2onnx) ---------------------------------------------------------


def test_a_channels_last_input_gets_its_data_channels_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    root = tmp_path / "photos"
    _write_images(root, {"a": [rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8) for _ in range(3)]})
    first = load_dataset(str(root), shape=ImageInput(3, 16, 16))
    last = load_dataset(str(root), shape=ImageInput(3, 16, 16, channels_last=True))
    assert last.channels_last and last.sample_shape == (16, 16, 3) and last.images.flags.c_contiguous
    assert np.array_equal(last.images, first.images.transpose(0, 2, 3, 1))
    assert np.array_equal(last.subset(np.array([2, 0])).images, last.images[[2, 0]])
    arrays = sources.load_calibration("synthetic:4", shape=ImageInput(1, 28, 28, channels_last=True))
    assert arrays.sample_shape == (28, 28, 1)  # arrays are laid out too
    given = sources.load_calibration(first, shape=ImageInput(3, 16, 16, channels_last=True))
    assert np.array_equal(given.images, last.images) and first.laid_out(False) is first


def test_augmentation_of_channels_last_batches_is_that_of_channels_first_ones() -> None:
    ds = load_dataset("synthetic:16")
    (first, _), *_ = list(torch_loader(ds, 16, augment=True, seed=3))
    (last, _), *_ = list(torch_loader(ds.laid_out(True), 16, augment=True, seed=3))
    assert torch.equal(last, first.permute(0, 2, 3, 1))


def test_a_folder_too_big_for_memory_is_read_in_parts_for_evaluation(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    rng = np.random.default_rng(6)
    images = {
        label: [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(7)] for label in "ab"
    }
    _write_images(tmp_path / "set", images)
    root = str(tmp_path / "set")
    whole = {norm: load_dataset(root, "test", image_norm=norm) for norm in ("unit", "data")}
    assert [len(p) for p in sources.dataset_parts(root)] == [14]  # fits: one part
    per_image = 3 * 8 * 8 * folders.FOLDER_BYTES_PER_ELEMENT
    monkeypatch.setattr(folders, "available_memory", lambda: 12 * per_image)  # parts of 3 images
    for norm, expected in whole.items():
        parts = list(sources.dataset_parts(root, image_norm=norm))
        assert [len(p) for p in parts] == [3, 3, 3, 3, 2]
        assert np.array_equal(np.concatenate([p.labels for p in parts]), expected.labels)
        np.testing.assert_allclose(np.concatenate([p.images for p in parts]), expected.images, atol=1e-5)
        assert {p.image_norm for p in parts} == {expected.image_norm}  # own statistics: of the whole here
    with pytest.raises(DataError, match="memory"):
        load_dataset(root)  # everything but evaluation holds a folder whole
    layout = ImageInput(3, 8, 8, channels_last=True)
    assert all(p.sample_shape == (8, 8, 3) for p in sources.dataset_parts(root, shape=layout))


def test_a_dataset_without_a_test_split_holds_one_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Accuracy measured on the training images would flatter the model: a folder without test/ (or an
    .npz without x_test) gives a seeded tenth of its samples as the test split, disjoint from training."""
    from graphprune.data import load_splits

    pixels = np.arange(40, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 4, 4), np.uint8)
    _write_images(tmp_path / "set", {"a": list(pixels[:20, 0]), "b": list(pixels[20:, 0])})
    np.savez(tmp_path / "xy.npz", x=pixels, y=np.arange(40) // 20)
    for spec in (str(tmp_path / "set"), str(tmp_path / "xy.npz")):
        train, test = load_splits(spec, image_norm="pixels")
        seen = [set(ds.images[:, 0, 0, 0].round().astype(int).tolist()) for ds in (train, test)]
        assert (
            (len(train), len(test)) == (36, 4)
            and not seen[0] & seen[1]
            and seen[0] | seen[1] == set(range(40))
        )
        assert (train.image_norm, test.image_norm) == ("pixels", "pixels")
        limited = load_splits(spec, train_limit=10, test_limit=2, image_norm="pixels")
        assert [len(ds) for ds in limited] == [10, 2]
        assert set(limited[1].images[:, 0, 0, 0].round().astype(int).tolist()) <= seen[1]  # still held out
    assert "no test split: 4 of its 40 samples" in caplog.text
    _write_images(tmp_path / "split" / "train", {"a": list(pixels[:3, 0])})
    _write_images(tmp_path / "split" / "test", {"a": list(pixels[3:5, 0])})
    assert [len(ds) for ds in load_splits(str(tmp_path / "split"))] == [3, 2]  # its own test split


def test_a_val_folder_is_the_test_split_and_a_missing_one_is_named(tmp_path: Path) -> None:
    from graphprune.data import load_splits

    pixels = [np.full((4, 4), v, np.uint8) for v in range(5)]
    _write_images(tmp_path / "imagenet" / "train", {"a": pixels[:3]})
    _write_images(tmp_path / "imagenet" / "val", {"a": pixels[3:]})
    assert [len(ds) for ds in load_splits(str(tmp_path / "imagenet"))] == [3, 2]  # ImageNet's layout
    assert len(load_dataset(str(tmp_path / "imagenet"), "test")) == 2
    _write_images(tmp_path / "trainonly" / "train", {"a": pixels})
    with pytest.raises(DataError, match=r"has train/ but no test split \(test/ or val/ or validation/\)"):
        load_dataset(str(tmp_path / "trainonly"), "test")  # eval's default split, one clear line
    assert [len(ds) for ds in load_splits(str(tmp_path / "trainonly"))] == [4, 1]  # held out


def _training_folder(root: Path) -> str:
    """12 random 8x8 RGB images in train/ (two classes) and 2 of them in test/; the folder's path."""
    rng = np.random.default_rng(7)
    images = {
        label: [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(6)] for label in "ab"
    }
    _write_images(root / "train", images)
    _write_images(root / "test", {"a": images["a"][:2]})
    return str(root)


def test_a_training_folder_too_big_for_memory_is_decoded_to_disk(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from graphprune.data import load_splits

    root = _training_folder(tmp_path / "set")
    layouts = (None, ImageInput(3, 8, 8, channels_last=True))
    in_memory = {layout: load_splits(root, image_norm="unit", shape=layout) for layout in layouts}
    monkeypatch.setattr(folders, "available_memory", lambda: 3 * 3 * 8 * 8 * folders.FOLDER_BYTES_PER_ELEMENT)
    monkeypatch.setattr(folders.tempfile, "tempdir", str(tmp_path / "spill"))
    (tmp_path / "spill").mkdir()
    for layout in layouts:
        train, test = load_splits(root, image_norm="unit", shape=layout)
        assert isinstance(train.images.base, np.memmap) and train.channels_last == (layout is not None)
        for got, expected in zip((train, test), in_memory[layout], strict=True):
            assert np.array_equal(got.images, expected.images) and np.array_equal(got.labels, expected.labels)
    (x, y), *_ = list(torch_loader(train, 4, shuffle=True, augment=True))  # trains from the file
    assert tuple(x.shape) == (4, 8, 8, 3) and all(
        p.name.startswith("graphprune-data-") for p in (tmp_path / "spill").iterdir()
    )
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(DataError, match="free in .*--train-limit"):
        load_splits(root)


def test_a_truncated_or_foreign_file_in_a_folder_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    _write_images(tmp_path / "set", {"a": [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)] * 2})
    photo = tmp_path / "set" / "a" / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(photo)
    photo.write_bytes(photo.read_bytes()[:400])  # cut short: the header reads, the pixels do not
    with pytest.raises(DataError, match=r"Cannot read the image .*photo\.jpg"):
        load_dataset(str(tmp_path / "set"))
    photo.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"Cannot read the image .*photo\.jpg"):
        load_dataset(str(tmp_path / "set"))


def test_under_torchrun_the_processes_of_a_machine_share_one_decoded_training_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local rank 0 decodes a training folder larger than memory to one file per run; the other local
    ranks map that file instead of decoding the folder again, and give up in one line when it never
    comes."""
    from graphprune.data import load_splits

    root = _training_folder(tmp_path / "set")
    monkeypatch.setattr(folders, "available_memory", lambda: 3 * 3 * 8 * 8 * folders.FOLDER_BYTES_PER_ELEMENT)
    monkeypatch.setattr(folders.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run7")
    monkeypatch.setenv("LOCAL_RANK", "0")
    written, _ = load_splits(root, image_norm="unit")
    (shared,) = tmp_path.glob("graphprune-data-run7-*")
    monkeypatch.setenv("LOCAL_RANK", "1")
    folder = folders.ImageFolder.scan(Path(root), "train", labels=True, limit=None, seed=0, shape=None)
    monkeypatch.setattr(
        folders.ImageFolder, "pixels", lambda *a: pytest.fail("local rank 1 decoded the folder")
    )
    mapped = folder.on_disk(folder.files, parse_normalization("unit"))
    assert np.array_equal(mapped.images, written.images) and isinstance(mapped.images.base, np.memmap)
    assert (shared / "images.f32").is_file()
    monkeypatch.setattr(folders, "SPILL_WAIT_S", 0.2)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run8")  # another run: nothing written for it
    with pytest.raises(DataError, match="local rank 0 did not decode"):
        load_splits(root, image_norm="unit")
