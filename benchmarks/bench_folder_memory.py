"""What loading a folder of photos costs in memory and time: graphprune.data.load_dataset fitting JPEG
files to a 3x224x224 input, with the data's own statistics and with a fixed normalisation.

A seeded folder of `--images` random 320x240 RGB JPEG files in 4 class folders is written once; each
normalisation is then loaded in a fresh Python process, which reports how far loading raised its peak
resident memory (ru_maxrss) and how long it took. "bytes per pixel" is the peak rise over the uint8
elements loaded (images x 3 x 224 x 224): the float32 result alone is 4; the memory guard
(graphprune.data.folders.FOLDER_BYTES_PER_ELEMENT) counts 5.

.venv/bin/python benchmarks/bench_folder_memory.py --images 1600
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, header, machine, markdown_table, save_and_print
from PIL import Image

from graphprune.data.folders import FOLDER_BYTES_PER_ELEMENT

SIZE = 224
PROBE = f"""
import json, resource, sys, time
from graphprune.data import ImageInput, load_dataset
start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_dataset(sys.argv[1], shape=ImageInput(3, {SIZE}, {SIZE}), image_norm=sys.argv[2])
rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({{"images": len(data), "peak_rise_bytes": rise, "seconds": time.perf_counter() - start,
                  "float32_bytes": data.images.nbytes}}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--images", type=int, default=1600, help="JPEG files in the folder")
    p.add_argument("--norms", nargs="+", default=["data", "imagenet"], help="--image-norm values to load")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for folder_memory.json/.md")
    return p.parse_args(argv)


def write_photos(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")


def load(root: Path, image_norm: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(root), image_norm], capture_output=True, text=True, check=True
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["bytes_per_pixel"] = row["peak_rise_bytes"] / (row["images"] * 3 * SIZE * SIZE)
    return row


def render(payload: dict) -> str:
    lines = header("Loading a folder of photos", payload["machine"], __doc__)
    rows = [
        [
            norm,
            row["images"],
            f"{row['float32_bytes'] / 2**20:.0f}",
            f"{row['peak_rise_bytes'] / 2**20:.0f}",
            f"{row['bytes_per_pixel']:.2f}",
            f"{row['seconds']:.1f}",
        ]
        for norm, row in payload["rows"].items()
    ]
    columns = ["--image-norm", "images", "float32 MB", "peak rise MB", "bytes per pixel", "seconds"]
    return "\n".join(lines) + "\n" + markdown_table(columns, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "photos"
        write_photos(root, args.images)
        rows = {norm: load(root, norm) for norm in args.norms}
    payload = {"machine": machine(), "guard_bytes_per_pixel": FOLDER_BYTES_PER_ELEMENT, "rows": rows}
    save_and_print(args.results, "folder_memory", payload, render)


if __name__ == "__main__":
    main()
