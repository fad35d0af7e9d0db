"""CLI on the shipped reference model: plots, and commands that must not need torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from graphprune.cli.demo import REFERENCE


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graphprune.cli", *map(str, args)], capture_output=True, text=True
    )


def test_prune_draws_channels_per_layer(tmp_path: Path) -> None:
    out, png = tmp_path / "half.onnx", tmp_path / "channels.png"
    done = run("prune", REFERENCE, "-o", out, "--target-macs", "0.5", "--plot", png)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.exists()
    assert "--round-to 8" in " ".join(done.stderr.split())  # 11/22/44 wide: the latency tip is shown
    rounded = run("prune", REFERENCE, "-o", tmp_path / "r16.onnx", "--target-macs", "0.5", "--round-to", "16")
    assert rounded.returncode == 0 and "tip" not in rounded.stderr


def test_eval_and_analyze_do_not_import_torch() -> None:
    probe = (
        "import sys; from graphprune.cli import main; "
        f"main(['analyze', {str(REFERENCE)!r}]); "
        f"main(['eval', {str(REFERENCE)!r}, '--data', 'synthetic:64', '--split', 'test']); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_prune_threads_reach_calibration_and_verification(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from graphprune import cli
    from graphprune.runtime import activations, session
    from graphprune.surgery import verify

    opened: list[tuple[str, int | None]] = []

    def recording(module: str):  # noqa: ANN202 - make_session, recording who asked for how many threads
        def make(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            opened.append((module, kwargs.get("threads")))
            return session.make_session(*args, **kwargs)

        return make

    monkeypatch.setattr(activations, "make_session", recording("calibration"))
    monkeypatch.setattr(verify, "make_session", recording("verification"))
    out = tmp_path / "act.onnx"
    args = ["prune", str(REFERENCE), "-o", str(out), "--ratio", "0.3", "--criterion", "mean_act"]
    assert cli.main([*args, "--calib", "synthetic:32", "--threads", "1"]) == 0 and out.exists()
    assert {module for module, _ in opened} == {"calibration", "verification"}
    assert all(threads == 1 for _, threads in opened), opened
    refused = run("prune", REFERENCE, "-o", tmp_path / "x.onnx", "--ratio", "0.3", "--threads", "0")
    message = (refused.stdout + refused.stderr).strip().splitlines()
    assert refused.returncode == 2 and message == ["graphprune: error: --threads must be at least 1, got 0."]
    assert not (tmp_path / "x.onnx").exists()


def test_demo_runs_end_to_end_on_synthetic_data(tmp_path: Path) -> None:
    import onnx

    from graphprune.onnxutil import conv_channels

    done = run("demo", "--out", tmp_path, "--data", "synthetic:128", "--train-limit", "64", "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)  # the JSON alone on stdout
    assert numbers["verification"]["tensors"] > 0 and numbers["original"]["macs"] > numbers["pruned"]["macs"]
    assert str(tmp_path / "resnet20_pruned_finetuned.onnx") in numbers["files"]
    for name in ("resnet20_pruned_finetuned.onnx", "channels_per_layer.png", "accuracy_vs_macs.png"):
        assert (tmp_path / name).stat().st_size > 0
    widths = conv_channels(onnx.load(str(tmp_path / "resnet20_pruned.onnx"))).values()
    assert all(width % 16 == 0 for width in widths) and "pruned + recovered + fine-tuned" in numbers
    assert (
        "pruned + recovered" in numbers and (tmp_path / "resnet20_pruned_recovered.onnx").stat().st_size > 0
    )


def test_a_folder_of_photos_of_any_size_feeds_eval_and_calibration(tmp_path: Path) -> None:
    """Images of mixed sizes and modes are fitted to the model's 1x28x28 input (gray, resize, centre
    crop), not refused."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for index, size in enumerate([(40, 36), (60, 90, 3), (28, 28)]):  # one RGB: made gray
                pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / label / f"{index}.png")
    done = run("eval", REFERENCE, "--data", tmp_path / "photos", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 6
    out = tmp_path / "calibrated.onnx"
    done = run(
        "prune",
        REFERENCE,
        "-o",
        out,
        "--ratio",
        "0.3",
        "--criterion",
        "mean_act",
        "--calib",
        tmp_path / "photos",
    )
    assert done.returncode == 0, done.stderr
