"""What reading a folder of photos with the wrong normalisation costs: the shipped Fashion-MNIST ResNet-20
evaluated on folders of Fashion-MNIST test images written as PNG files.

Folders (seeded draws from the Fashion-MNIST test split, one sub-folder per class so that labels stay
0..9): "balanced", the same number of images per class; "footwear", a shop's photos: mostly sandals,
sneakers and ankle boots (classes 5, 7, 9), a few of each other class. Each folder is evaluated through
`graphprune eval`'s loader (graphprune.data.load_dataset, then onnxruntime) with `--image-norm data`
(each channel standardised with the folder's own mean and std: graphprune's only behaviour before
`--image-norm`), with the normalisation the model records (0.286/0.353, the statistics it was trained
with; the default now) and with `unit` (pixels / 255, a wrong guess), and against the very same images
read from the IDX arrays (the reference).

.venv/bin/python benchmarks/bench_image_norm.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import RESULTS, header, machine, markdown_table, save_and_print
from PIL import Image

from graphprune.data import load_dataset
from graphprune.data.sources import fashion_mnist_dir, read_idx
from graphprune.model_io import input_image_norm
from graphprune.runtime.evaluate import evaluate_onnx

MODEL = Path(__file__).resolve().parent.parent / "graphprune" / "zoo" / "weights" / "resnet20_fmnist.onnx"
FOOTWEAR = (5, 7, 9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--per-class", type=int, default=200, help="images per class (footwear: per shoe class)")
    p.add_argument("--others", type=int, default=20, help="footwear folder: images per other class")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for image_norm.json/.md")
    return p.parse_args(argv)


def write_folder(root: Path, counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """PNG files of `counts[c]` seeded test images of each class c under root/<c>/; their indices, in
    the order the folder lists them."""
    folder = fashion_mnist_dir()
    images, labels = (
        read_idx(folder / "t10k-images-idx3-ubyte.gz"),
        read_idx(folder / "t10k-labels-idx1-ubyte.gz"),
    )
    rng = np.random.default_rng(seed)
    chosen = []
    for label, count in counts.items():
        (root / f"{label}").mkdir(parents=True)
        picked = sorted(rng.choice(np.flatnonzero(labels == label), count, replace=False))
        for index in picked:
            Image.fromarray(images[index]).save(root / f"{label}" / f"{index:05d}.png")
        chosen += picked  # zero-padded names: the folder lists them in this order
    return np.asarray(chosen)


def measure(root: Path, indices: np.ndarray, recorded: str) -> dict[str, object]:
    """Accuracy of the model on the folder under each normalisation, and on the same images as arrays."""
    reference = load_dataset("fashion-mnist", "test").subset(indices)
    row: dict[str, object] = {"images": len(indices)}
    for label, image_norm in (("data", "data"), ("recorded", recorded), ("unit", "unit")):
        data = load_dataset(str(root), image_norm=image_norm)
        assert np.array_equal(data.labels, reference.labels)
        row[label] = evaluate_onnx(MODEL, data)
        if label == "data":
            row["own_statistics"] = data.image_norm
    row["arrays"] = evaluate_onnx(MODEL, reference)
    return row


def render(payload: dict) -> str:
    lines = header("Image normalisation of a folder", payload["machine"], __doc__)
    rows = [
        [
            name,
            row["images"],
            row["own_statistics"],
            f"{row['data']:.3f}",
            f"{row['recorded']:.3f}",
            f"{row['unit']:.3f}",
            f"{row['arrays']:.3f}",
        ]
        for name, row in payload["folders"].items()
    ]
    columns = [
        "folder",
        "images",
        "own mean/std",
        "data",
        f"recorded ({payload['recorded']})",
        "unit",
        "arrays",
    ]
    return "\n".join(lines) + "\n" + markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recorded = input_image_norm(onnx.load(MODEL))
    assert recorded is not None, "the shipped model records its normalisation"
    plans = {
        "balanced": dict.fromkeys(range(10), args.per_class),
        "footwear": {c: args.per_class if c in FOOTWEAR else args.others for c in range(10)},
    }
    folders = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, counts in plans.items():
            root = Path(scratch) / name
            folders[name] = measure(root, write_folder(root, counts), recorded)
    payload = {"machine": machine(), "model": MODEL.name, "recorded": recorded, "folders": folders}
    save_and_print(args.results, "image_norm", payload, render)


if __name__ == "__main__":
    main()
