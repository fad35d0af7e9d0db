"""Models from several exporters, pruned at ratio 0.5: each pruned exactly or refused per group.

Exporters: torch (legacy and dynamo, torchvision models), tf2onnx (Keras applications), paddle2onnx
(paddle.vision) and ultralytics (YOLO11n, YOLOv8n-seg, its own exporter). The frameworks are benchmark-
only: tf2onnx and paddle2onnx run in their own virtual environments (GRAPHPRUNE_TF_PYTHON,
GRAPHPRUNE_PADDLE_PYTHON: the python of a venv holding tensorflow-cpu + tf2onnx + tf-keras, or
paddlepaddle + paddle2onnx), ultralytics in this one; a framework that is missing is reported as such.

Each model is pruned with verification (graphprune's own check), then checked once more end to end:
the pruned model against the masked reference on a fresh seeded input, outputs only. Then the round
trip a user makes with a folder of photos (JPEG files of odd sizes in 4 class folders, generated), each
step a graphprune command: `prune --calib photos --criterion mean_act --recover lsq`, and for a
classifier `eval` of the pruned model and `finetune` (1 epoch) of it. The folder is fitted and laid out
to each model's input (channels-last for Keras).

    python benchmarks/bench_exporters.py [--out /tmp/exporters]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import onnx

from graphprune.api import prune
from graphprune.errors import GraphPruneError
from graphprune.planning import PlanOptions
from graphprune.runtime.session import input_feed, make_session
from graphprune.surgery.apply import masked_reference

SIZE = 96

# What a table row cannot say (measured with tensorflow-cpu 2.21 + tf-keras 2.21 + tf2onnx 1.17,
# paddlepaddle 3.3.1 + paddle2onnx 2.1.0, ultralytics 8.4.190, each exporter at its defaults).
NOTES = """
ConvNeXtTiny is refused as a file, not by a rule: tf2onnx 1.17 leaves its grouped Conv2D as a
PartitionedCall and its exact GELU as Erfc, which are no ONNX ops, so onnxruntime cannot open the file
either. A model that only fails onnx.checker (nodes out of topological order, say) but that onnxruntime
opens is analysed with a warning. The ultralytics models share one zero bias tensor across all convs
(onnxslim deduplicates equal constants); each conv now gets its own copy, so the attention and DFL
blocks keep only their own groups whole. "independent err" is the largest relative output difference,
pruned model vs masked reference, on a fresh seeded input (outputs only).
"""

KERAS = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf, tf2onnx
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = getattr(tf.keras.applications, name)(weights=None, input_shape=(size, size, 3))
spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)
tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=out)
"""

PADDLE = """
import sys
import paddle
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = getattr(paddle.vision.models, name)()
model.eval()
spec = [paddle.static.InputSpec([None, 3, size, size], "float32", "x")]
paddle.onnx.export(model, out[: -len(".onnx")], input_spec=spec, opset_version=13)
"""

ULTRALYTICS = """
import os, shutil, sys
os.environ["YOLO_OFFLINE"] = "1"
from ultralytics import YOLO
name, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
shutil.move(YOLO(f"{name}.yaml").export(format="onnx", imgsz=size), out)
"""


def torch_export(name: str, dynamo: bool) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        import torch
        import torchvision

        torch.manual_seed(0)
        module = getattr(torchvision.models, name)().eval()
        torch.onnx.export(module, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=dynamo)

    return build


def script(python: str | None, code: str, name: str, size: int = SIZE) -> Callable[[Path], None]:
    """Run an exporter in another interpreter (its own venv) or this one."""

    def build(path: Path) -> None:
        if python is None:
            raise FileNotFoundError("framework not installed here (set its python, see the docstring)")
        with tempfile.TemporaryDirectory() as work:
            done = subprocess.run(
                [python, "-c", code, name, str(size), str(path)], capture_output=True, text=True, cwd=work
            )
        if done.returncode or not path.exists():
            raise RuntimeError(
                " ".join(done.stderr.strip().splitlines()[-1:]) or "the exporter wrote nothing"
            )

    return build


def ultralytics_python() -> str | None:
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        return None
    return sys.executable


MODELS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("torch legacy", "resnet18", torch_export("resnet18", dynamo=False)),
    ("torch dynamo", "mobilenet_v3_small", torch_export("mobilenet_v3_small", dynamo=True)),
    ("tf2onnx (Keras)", "MobileNetV2", script(os.environ.get("GRAPHPRUNE_TF_PYTHON"), KERAS, "MobileNetV2")),
    ("tf2onnx (Keras)", "ResNet50", script(os.environ.get("GRAPHPRUNE_TF_PYTHON"), KERAS, "ResNet50")),
    (
        "tf2onnx (Keras)",
        "ConvNeXtTiny",
        script(os.environ.get("GRAPHPRUNE_TF_PYTHON"), KERAS, "ConvNeXtTiny"),
    ),
    ("paddle2onnx", "resnet18", script(os.environ.get("GRAPHPRUNE_PADDLE_PYTHON"), PADDLE, "resnet18")),
    ("ultralytics", "yolo11n", script(ultralytics_python(), ULTRALYTICS, "yolo11n", 320)),
    ("ultralytics", "yolov8n-seg", script(ultralytics_python(), ULTRALYTICS, "yolov8n-seg", 320)),
]


def outputs_match(result) -> float:  # noqa: ANN001 - PruneResult
    """Largest relative output difference, pruned vs masked reference, on a fresh seeded input."""
    reference = masked_reference(result.dep, result.removed)
    feed = input_feed(reference, batch=1, seed=123)
    expected = make_session(reference).run(None, feed)
    actual = make_session(result.model).run(None, feed)
    return max(
        float(np.max(np.abs(e - a))) / max(float(np.max(np.abs(e))), 1e-12)
        for e, a in zip(expected, actual, strict=True)
    )


def write_photos(root: Path, classes: int = 4, per_class: int = 8) -> Path:
    """JPEG files of seeded random RGB pixels, of several sizes, in `classes` class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(120 + 5 * index, 100, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{label}" / f"{index}.jpg")
    return root


def folder_round_trip(path: Path, photos: Path) -> str:
    """The graphprune commands a user runs with a folder of photos: "ok (steps)" or the first failure."""
    from graphprune.cli.main import main as graphprune

    pruned, tuned = path.with_name(f"{path.stem}-calibrated.onnx"), path.with_name(f"{path.stem}-tuned.onnx")
    calib = ["--calib", str(photos), "--calib-samples", "16", "--criterion", "mean_act", "--recover", "lsq"]
    steps = [("prune", ["prune", str(path), "-o", str(pruned), "--ratio", "0.5", *calib])]
    if len(make_session(path).get_outputs()[0].shape) == 2:  # a classifier
        steps += [
            ("eval", ["eval", str(pruned), "--data", str(photos)]),
            ("finetune", ["finetune", str(pruned), "-o", str(tuned), "--data", str(photos), "--epochs", "1"]),
        ]
    for step, argv in steps:
        if graphprune(argv) != 0:
            return f"{step} failed (see its error above)"
    return f"ok ({', '.join(step for step, _ in steps)})"


def run_one(
    exporter: str, name: str, build: Callable[[Path], None], folder: Path, photos: Path
) -> dict[str, object]:
    row: dict[str, object] = {"exporter": exporter, "model": name}
    path = folder / f"{exporter.split()[0]}-{name}.onnx"
    try:
        build(path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is a result to report
        return {**row, "status": "not exported", "reason": " ".join(str(exc).split())[:200]}
    try:
        result = prune(path, PlanOptions(ratio=0.5))
    except GraphPruneError as exc:
        return {**row, "status": "refused", "reason": " ".join(str(exc).split())[:300]}
    groups = result.dep.groups
    blocked = sorted(set(result.dep.blocked_nodes))
    return {
        **row,
        "status": "pruned exactly" if result.removed.any() else "nothing prunable",
        "opset": next(
            (o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None
        ),
        "groups": len(groups),
        "prunable_groups": len(result.dep.prunable_groups),
        "blocked": blocked,
        "macs_kept": result.after.macs / result.before.macs,
        "verify_max_rel_err": result.verification.max_rel_error,
        "independent_max_rel_err": outputs_match(result),
        "folder": folder_round_trip(path, photos),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the exported models (default: temporary)")
    args = parser.parse_args()
    info = common.machine()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.out or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        photos = write_photos(folder / "photos")
        for exporter, name, build in MODELS:
            rows.append(run_one(exporter, name, build, folder, photos))
            print(rows[-1], flush=True)
    common.write_json(common.RESULTS / "exporters.json", {"machine": info, "ratio": 0.5, "rows": rows})
    table = common.markdown_table(
        [
            "exporter",
            "model",
            "result",
            "groups (prunable)",
            "MACs kept",
            "verify err",
            "independent err",
            "folder of photos",
            "blocked / reason",
        ],
        [
            [
                r["exporter"],
                r["model"],
                r["status"],
                f"{r['groups']} ({r['prunable_groups']})" if "groups" in r else "-",
                f"{r['macs_kept']:.3f}" if "macs_kept" in r else "-",
                f"{r['verify_max_rel_err']:.1e}" if "verify_max_rel_err" in r else "-",
                f"{r['independent_max_rel_err']:.1e}" if "independent_max_rel_err" in r else "-",
                r.get("folder", "-"),
                "; ".join(r.get("blocked", [])) or r.get("reason", ""),
            ]
            for r in rows
        ],
    )
    common.write_text(
        common.RESULTS / "exporters.md",
        f"# Models from several exporters at ratio 0.5\n\n{common.machine_line(info)}\n\n{table}{NOTES}",
    )


if __name__ == "__main__":
    main()
