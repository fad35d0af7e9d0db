"""Deployment readiness (issue 11): plans replayed on the right model only, hand edits that disagree,
packaging, torch-free commands, quantized and fp16 models, label-free calibration, dynamic spatial
sizes, and the command line's first contact."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Net

from graphprune.api import prune, verify_plan
from graphprune.errors import PlanError
from graphprune.planning import PlanOptions
from graphprune.planning.plan import PruningPlan


def residual(seed: int = 0, channels: int = 4) -> onnx.ModelProto:
    """conv a -> conv b, a + b: a residual group of two tied producers."""
    net = Net(channels, seed=seed)
    a = net.op("Relu", [net.conv(net.x, 8)])
    b = net.conv(a, 8)
    return net.build(net.head(net.op("Add", [a, b])))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path, PruningPlan]:
    """The residual model on disk, a second (different) model, and a plan made for the first."""
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(residual(0), first)
    onnx.save(residual(1), second)
    return first, second, prune(first, PlanOptions(ratio=0.5)).plan


def test_plan_replay_on_another_model_is_refused_unless_forced(saved, caplog) -> None:  # noqa: ANN001
    first, second, plan = saved
    assert plan.model_sha256 is not None
    prune(first, plan=plan)  # the model it was made for
    with pytest.raises(PlanError, match="made for another model"):
        prune(second, plan=plan)
    with pytest.raises(PlanError, match="made for another model"):
        verify_plan(second, prune(first, plan=plan).model, plan)
    with caplog.at_level(logging.WARNING):
        prune(second, plan=plan, force=True)
    assert "replaying it anyway" in caplog.text


def test_hand_edited_plan_whose_tied_entries_disagree_is_refused(saved) -> None:  # noqa: ANN001
    first, _, plan = saved
    tied = [node for node in plan.remove if node in ("conv1", "conv3")]
    assert len(tied) == 2  # both producers of the residual sum are listed
    edited = PruningPlan({**plan.remove, "conv3": plan.remove["conv3"][1:]}, model_sha256=plan.model_sha256)
    with pytest.raises(PlanError, match="group conv1 disagree: conv3 keeps channel"):
        prune(first, plan=edited)
    alone = PruningPlan(
        {k: v for k, v in plan.remove.items() if k != "conv3"}
    )  # one member of a tie is enough
    assert np.array_equal(prune(first, plan=alone).removed, prune(first, plan=plan).removed)


RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def resolved(extras: set[str]) -> dict[str, str]:
    """Distribution names (with their version specifiers) pip installs for graphprune[extras] (base requirements are evaluated with no
    extra, as pip does; each extra's requirements with that extra; self-references followed)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names: dict[str, str] = {}
    todo = [(text, "") for text in project["dependencies"]]
    seen: set[str] = set()
    for extra in extras:
        todo += [(text, extra) for text in project["optional-dependencies"][extra]]
    while todo:
        text, extra = todo.pop()
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        if requirement.name != "graphprune":
            names[requirement.name] = str(requirement.specifier)
            continue
        for sub in requirement.extras - seen:
            seen.add(sub)
            todo += [(t, sub) for t in project["optional-dependencies"][sub]]
    return names


@pytest.mark.parametrize("extras", [{"cpu"}, {"gpu"}, {"torch", "gpu"}, {"torch", "cpu"}, {"dev"}])
def test_every_install_gets_exactly_one_onnxruntime(extras: set[str]) -> None:
    names = resolved(extras)
    assert len(names.keys() & RUNTIMES) == 1, names
    assert "==" not in names.get("torch", ""), "torch is pinned to one version"


def test_cuda_advice_names_the_swap_of_runtimes(monkeypatch) -> None:  # noqa: ANN001
    from graphprune.errors import GraphPruneError
    from graphprune.runtime import session

    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(
        GraphPruneError, match=r"pip uninstall -y onnxruntime && pip install 'graphprune\[gpu\]'"
    ):
        session.make_session(residual(), provider="cuda")


BLOCKER = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "torchvision", "onnx2torch"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize(
    "command",
    [
        ["export", "resnet20", "-o", "{tmp}/x.onnx"],
        ["train", "--model", "resnet20", "--data", "synthetic:64", "-o", "{tmp}/x.onnx"],
        ["finetune", "{model}", "-o", "{tmp}/x.onnx", "--data", "synthetic:64"],
        ["demo", "--out", "{tmp}/demo"],
        ["slim", "--model", "resnet20", "--data", "synthetic:64", "-o", "{tmp}/x.onnx"],
        ["gate-decorator", "--onnx", "{model}", "--target-flops", "0.5", "-o", "{tmp}/x.onnx"],
    ],
    ids=lambda c: c[0],
)
def test_torch_commands_without_torch_say_what_to_install(command: list[str], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from graphprune.cli.demo import REFERENCE

    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    argv = [part.format(tmp=tmp_path, model=REFERENCE) for part in command]
    done = subprocess.run(
        [sys.executable, "-m", "graphprune.cli", *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after at most a stage's start line
    assert last.startswith("graphprune: error:") and last.endswith("install graphprune[torch].")
    assert "Traceback" not in done.stderr and not (tmp_path / "x.onnx").exists()


def quantized(style: str) -> onnx.ModelProto:
    """A conv model quantized as QDQ (Q/DQ pairs around a float conv) or QOperator (QLinearConv)."""
    net = Net()
    scale, zero = net.const(0.05), net.const(0, dtype=np.uint8)
    q = net.op("QuantizeLinear", [net.x, scale, zero])
    if style == "QDQ":
        y = net.conv(net.op("DequantizeLinear", [q, scale, zero]), 8)
    else:
        w = net.const(np.ones((8, 4, 3, 3)), dtype=np.int8)
        wscale, wzero = net.const(0.01), net.const(0, dtype=np.int8)
        y = net.op("DequantizeLinear", [
            net.op("QLinearConv", [q, scale, zero, w, wscale, wzero, scale, zero], pads=[1] * 4), scale, zero
        ])  # fmt: skip
    return net.build(net.head(net.op("Relu", [y])))


@pytest.mark.parametrize("style", ["QDQ", "QOperator"])
def test_quantized_models_are_refused_saying_to_prune_before_quantization(style: str) -> None:
    from graphprune.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=f"quantized \\({style}.*prune the float model before"):
        prune(quantized(style), PlanOptions(ratio=0.5))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float16 (weights, inputs and outputs)."""
    from onnx import TensorProto, numpy_helper

    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def test_fp16_model_is_verified_at_an_fp16_tolerance_and_says_so() -> None:
    net = Net(channels=16, size=16)
    x = net.x
    for _ in range(4):
        x = net.op("Relu", [net.bn(net.conv(x, 32))])
    result = prune(to_fp16(net.build(net.head(x))), PlanOptions(ratio=0.5))
    report = result.verification
    assert report.precision == "fp16" and report.tolerance == 1e-2
    assert 1e-4 < report.max_rel_error < 1e-2  # fp16 round-off: above the fp32 tolerance, far below 1
    exact = prune(residual(), PlanOptions(ratio=0.5)).verification
    assert exact.precision == "fp32" and exact.tolerance == 1e-4


def label_free_sources(tmp_path: Path) -> dict[str, Path]:
    """Calibration images without labels: an images-only .npz, an .npz keyed by the model's input name,
    and a flat folder of image files (3x8x8 uint8 images, channels last)."""
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 255, size=(12, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    np.savez(tmp_path / "by_input_name.npz", **{"input.1": images})
    folder = tmp_path / "flat"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image, "RGB").save(folder / f"{index}.png")
    return {
        "images.npz": tmp_path / "images.npz",
        "input-name.npz": tmp_path / "by_input_name.npz",
        "flat": folder,
    }


def test_label_free_calibration_data_is_accepted_where_no_label_is_needed(tmp_path: Path) -> None:
    from graphprune.data import load_dataset
    from graphprune.errors import DataError

    model = residual(channels=3)
    for name, source in label_free_sources(tmp_path).items():
        result = prune(
            model, PlanOptions(ratio=0.5), criterion="mean_act", calib=str(source), calib_samples=8
        )
        assert result.removed.any(), name
        with pytest.raises(DataError, match="needs labelled data"):
            prune(model, PlanOptions(ratio=0.5), criterion="taylor", calib=str(source))
        with pytest.raises(DataError):  # training and evaluation still need labels
            load_dataset(str(source))


def test_pruning_keeps_the_models_metadata_and_records_the_image_norm_given(tmp_path: Path) -> None:
    """Deployment code reads metadata_props (class names, strides); the pruned model keeps them, its
    doc string and version, and records a fixed image normalisation it was calibrated with, which
    the next calibration of it then uses."""
    from graphprune.api import Scoring, analyze_model
    from graphprune.model_io import IMAGE_NORM_KEY, set_metadata

    model = residual(channels=3)
    set_metadata(model, {"names": "{0: 'cat', 1: 'dog'}", "stride": "32"})
    model.doc_string, model.model_version = "a residual toy", 7
    plain = prune(model, PlanOptions(ratio=0.5)).model
    assert {p.key: p.value for p in plain.metadata_props} == {"names": "{0: 'cat', 1: 'dog'}", "stride": "32"}
    assert (plain.doc_string, plain.model_version) == ("a residual toy", 7)
    folder = label_free_sources(tmp_path)["flat"]
    options = PlanOptions(ratio=0.5)
    calibrated = prune(model, options, criterion="mean_act", calib=str(folder), image_norm="imagenet").model
    assert {p.key: p.value for p in calibrated.metadata_props}[IMAGE_NORM_KEY] == "imagenet"
    assert Scoring(calib=str(folder)).calibration(analyze_model(calibrated), 4).image_norm == "imagenet"
    assert Scoring(calib=str(folder)).calibration(analyze_model(plain), 4).image_norm != "imagenet"
    data = prune(model, options, criterion="mean_act", calib=str(folder), image_norm="data").model
    assert IMAGE_NORM_KEY not in {p.key for p in data.metadata_props}  # the calibration set's own: no record


def dynamic_hw(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with symbolic height and width on its input and output, as exported with dynamic axes."""
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for value in [*dynamic.graph.input, *dynamic.graph.output]:
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], ("H", "W"), strict=True):
            dim.dim_param = name
    return dynamic


def test_dynamic_hw_is_measured_and_verified_at_the_given_input_shape(tmp_path: Path) -> None:
    from graphprune.api import analyze_model, model_cost
    from graphprune.cli import main
    from graphprune.errors import GraphPruneError

    static = residual()  # 4x8x8 input
    model = dynamic_hw(static)
    macs = model_cost(static).macs
    assert model_cost(analyze_model(model).model).macs < macs / 32  # what 1x1 gives
    sized = analyze_model(model, {"x": (1, 4, 8, 8)})
    assert model_cost(sized.model).macs == macs
    with pytest.raises(GraphPruneError, match="symbolic spatial sizes.*--input-shape x:1x3x224x224"):
        prune(model, PlanOptions(target_macs=0.5))
    result = prune(model, PlanOptions(target_macs=0.5), input_shapes={"": (1, 4, 8, 8)})
    assert result.before.macs == macs and result.after.macs <= 0.5 * macs
    assert [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim[2:]] == ["H", "W"]
    from graphprune.runtime.session import input_feed

    assert input_feed(model, 2, shapes={"x": (1, 4, 8, 8)})["x"].shape == (2, 4, 8, 8)  # what bench feeds
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    for command in (["analyze", path], ["bench", path, "--runs", "2"]):
        assert main([*map(str, command), "--input-shape", "x:1x4x8x8"]) == 0
    assert main(["prune", str(path), "-o", str(tmp_path / "out.onnx"), "--target-macs", "0.5"]) == 2
    done = [
        "prune",
        str(path),
        "-o",
        str(tmp_path / "out.onnx"),
        "--target-macs",
        "0.5",
        "--input-shape",
        "1x4x8x8",
    ]
    assert main(done) == 0


def test_latency_work_on_dynamic_hw_needs_the_input_shape(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A latency table or target at 1x1 would be met on paper only: profile and latency planning are
    refused in one line without --input-shape; profiled with it, the table plans the sized model and
    is refused for an unsized one."""
    from graphprune.cli import main

    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_hw(residual()), path)
    lut, out = tmp_path / "lut.json", tmp_path / "out.onnx"
    capsys.readouterr()
    for command in (
        ["profile", path, "-o", lut],
        ["prune", path, "-o", out, "--target-latency", "0.6"],
        ["prune", path, "-o", out, "--target-macs", "0.5", "--global", "--objective", "latency"],
    ):
        assert main([*map(str, command)]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert (
            len(errors) == 1 and "symbolic spatial sizes" in errors[0] and "--input-shape x:1x3" in errors[0]
        )
    assert not lut.exists() and not out.exists()
    assert (
        main(
            [
                "profile",
                str(path),
                "-o",
                str(lut),
                "--input-shape",
                "x:1x4x8x8",
                "--runs",
                "2",
                "--rounds",
                "1",
            ]
        )
        == 0
    )
    plan = ["prune", str(path), "-o", str(out), "--ratio", "0.5", "--latency-lut", str(lut)]
    assert main([*plan, "--input-shape", "x:1x4x8x8"]) == 0
    assert main([*plan, "--input-shape", "x:1x4x16x16"]) == 2
    assert "profile this model again (with the --input-shape you plan with)" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_means_and_its_default() -> None:
    import argparse

    from graphprune.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if action.help != argparse.SUPPRESS:
                assert action.help, f"graphprune {name} {action.option_strings or action.dest} has no help"
    text = " ".join(commands["prune"].format_help().split())
    assert "--max-ratio MAX_RATIO most of one group --global may remove (default: 0.9)" in text
    assert all(name in parser.format_help() for name in commands)


def test_one_name_per_idea_and_exclude_takes_one_value_per_flag(capsys) -> None:  # noqa: ANN001
    from graphprune.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["prune", "--exclude", "conv1", "m.onnx", "-o", "o.onnx", "--exclude", "conv3"])
    assert (args.model, args.exclude) == ("m.onnx", ["conv1", "conv3"])
    assert (
        parser.parse_args(["criteria", "m.onnx", "--calib", "d", "--calib-samples", "7"]).calib_samples == 7
    )
    assert parser.parse_args(["criteria", "m.onnx", "--calib", "d", "--samples", "7"]).calib_samples == 7
    assert "--samples is deprecated; use --calib-samples" in capsys.readouterr().err
    for command in (["finetune", "m.onnx"], ["train"], ["slim", "--model", "resnet20"]):
        args = parser.parse_args(
            [*command, "-o", "o.onnx", "--data", "d", "--train-limit", "5", "--val-limit", "3"]
        )
        assert (args.train_limit, args.val_limit) == (5, 3)
    assert parser.parse_args(["finetune", "m", "-o", "o", "--data", "d", "--limit", "5"]).train_limit == 5
    assert parser.parse_args(["demo", "--train-limit", "5"]).train_limit == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.startswith("graphprune 0.")


def test_long_work_writes_plain_progress_lines_when_stderr_is_not_a_terminal() -> None:
    import subprocess
    import sys

    from graphprune.cli.demo import REFERENCE

    done = subprocess.run(
        [sys.executable, "-m", "graphprune.cli", "bench", str(REFERENCE), "--runs", "20", "--warmup", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("bench (5 rounds): 100%") and "5/5" in line for line in lines)


def test_progress_lines_are_whole_lines(capsys, monkeypatch) -> None:  # noqa: ANN001
    from graphprune.runtime import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    for _ in progress.progress(range(3), desc="work"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("work: 100%") and "3/3" in lines[-1]
    assert len(lines) == len(set(lines))  # no duplicate line


def test_bench_table_fits_80_columns_and_tells_same_named_files_apart(tmp_path: Path) -> None:
    import subprocess
    import sys

    paths = []
    for folder in ("baseline-models-from-the-training-run", "pruned-models-after-finetuning"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "resnet20_fashion_mnist_model.onnx")
        onnx.save(residual(), paths[-1])
    done = subprocess.run(
        [sys.executable, "-m", "graphprune.cli", "bench", *map(str, paths), "--runs", "3", "--batch", "1,2"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "80"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 80, done.stdout
    rows = [line.split() for line in lines if line.strip().endswith("x")]
    assert len(rows) == 4 and all(len(row) == 9 for row in rows), done.stdout  # one line per row
    assert len({row[0] for row in rows}) == 2  # the two files are told apart


def test_short_names_keep_just_enough_of_each_path() -> None:
    from graphprune.report.tables import short_names

    assert short_names(["a/m.onnx", "b/m.onnx", "c/x.onnx"]) == ["a/m.onnx", "b/m.onnx", "x.onnx"]
    assert short_names(["m.onnx", "m.onnx"]) == ["m.onnx", "m.onnx"]


def test_external_data_is_written_with_the_models_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from graphprune.model_io import save_model

    net = Net(channels=16)
    model = net.build(net.head(net.conv(net.x, 32)))  # weights over the external-data threshold
    save_model(model, tmp_path / "m.onnx", external_data=True)
    modes = {stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("m.onnx", "m.onnx.data")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


def test_external_data_output_can_be_written_again_from_its_own_folder(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """onnx's own external-data save refuses a data file that exists relative to the working folder:
    pruning twice to pruned.onnx in the current folder failed with an internal error."""
    from graphprune.model_io import load_model, save_model

    net = Net(channels=16)
    model = net.build(net.head(net.conv(net.x, 32)))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        save_model(model, "m.onnx", external_data=True)
    loaded = load_model(tmp_path / "m.onnx")
    assert loaded.external_data and (tmp_path / "m.onnx.data").stat().st_size > 0
    assert {i.name: i.raw_data for i in loaded.proto.graph.initializer} == {
        i.name: i.raw_data for i in model.graph.initializer
    }


def test_equal_constants_deduplicated_across_layers_do_not_tie_them() -> None:
    """The YOLO11 / yolov8n-seg pattern after ultralytics' export (onnxslim): every randomly initialised
    conv's folded bias is zero, the simplifier keeps one zero tensor for all of them, and reading it as a
    shared weight tied the whole network into one group, which the detection head's blocked channels
    (here a Softmax across channels) then kept whole.  Each layer must keep its own groups."""
    from helpers import prune_checked

    from graphprune.api import analyze_model

    net = Net()
    zeros = net.const(np.zeros(8), "zeros")
    conv = lambda x: net.op("Conv", [x, net.random(8, net.channels(x), 3, 3), zeros], pads=[1] * 4)  # noqa: E731
    head = net.op("Softmax", [conv(net.x)], axis=1)  # blocks its own channels only
    body = net.op("Relu", [conv(net.op("Relu", [conv(net.x)]))])
    model = net.build(net.op("Add", [head, net.conv(body, 8)]))
    dep = analyze_model(model)
    assert len(dep.prunable_groups) == 2 and "Softmax" in " ".join(dep.blocked_nodes)
    prune_checked(model, 0.5)


def test_a_model_the_checker_rejects_but_onnxruntime_runs_is_analysed_with_a_warning(
    tmp_path: Path, caplog
) -> None:  # noqa: ANN001
    """tf2onnx (Keras ConvNeXt) may write nodes out of topological order: onnx.checker refuses that,
    onnxruntime sorts them itself.  Analyse (sorted), warn; refuse only what neither accepts."""
    from helpers import prune_checked

    from graphprune.errors import InvalidModelError

    model = residual()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    path = tmp_path / "unsorted.onnx"
    onnx.save(model, path)
    with caplog.at_level(logging.WARNING):
        prune_checked(path, 0.5)
    assert "fails onnx.checker" in caplog.text and "onnxruntime runs it" in caplog.text
    model.graph.node[0].op_type = "PartitionedCall"  # an op tf2onnx left unconverted
    onnx.save(model, path)
    with pytest.raises(InvalidModelError, match="PartitionedCall are no ONNX ops"):
        prune(path, PlanOptions(ratio=0.5))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_group_norm_prunes_whole_groups_exactly(exporter: str, tmp_path: Path) -> None:
    """torch exports GroupNorm as Reshape [N, G, -1] -> InstanceNormalization -> Reshape -> Mul -> Add:
    whole groups go (the group count shrinks), the others are normalised exactly as before."""
    import torch
    from helpers import prune_checked

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.GroupNorm(4, 16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 3, padding=1),
    ).eval()
    with torch.no_grad():
        module[1].weight.uniform_(0.5, 1.5)
        module[1].bias.uniform_(-0.5, 0.5)
    path = tmp_path / "gn.onnx"
    torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), str(path), dynamo=exporter == "dynamo")
    result = prune_checked(path, 0.5, batch=1)  # exported with a static batch
    norms = [n for n in result.model.graph.node if n.op_type == "InstanceNormalization"]
    scale = next(i for i in result.model.graph.initializer if i.name == norms[0].input[1])
    assert tuple(scale.dims) == (2,)  # 2 of the 4 groups are left
    conv = next(i for i in result.model.graph.initializer if tuple(i.dims)[1:] == (8, 3, 3))
    assert conv.dims[0] == 8


def test_group_normalization_op_prunes_whole_groups_and_updates_num_groups() -> None:
    """Scale and bias per channel (opset 21) or per group (opset 18, which onnx.checker calls deprecated
    but onnxruntime runs)."""
    from helpers import BATCH

    for opset, params in ((18, 4), (21, 16)):
        net = Net(opset=opset)
        y = net.conv(net.x, 16)
        scale, bias = net.random(params, low=0.5, high=1.5), net.random(params)
        y = net.op("Relu", [net.op("GroupNormalization", [y, scale, bias], num_groups=4, epsilon=1e-5)])
        out = net.head(y)
        result = prune(net.model(out, shapes=((BATCH, 6, 8, 8),)), PlanOptions(ratio=0.5))
        assert result.verification.ok and result.removed.any()
        node = next(n for n in result.model.graph.node if n.op_type == "GroupNormalization")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kept = next(i for i in result.model.graph.initializer if i.name == node.input[1])
        assert attrs["num_groups"] == 2 and tuple(kept.dims) == (params // 2,), opset


def test_every_command_that_reports_numbers_can_print_them_as_json() -> None:
    """Pipelines read results: each command bar export (which only writes a file) takes --json."""
    import argparse

    from graphprune.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        name
        for name, command in commands.items()
        if name != "export"
        and "--json" not in {flag for action in command._actions for flag in action.option_strings}
    ]
    assert missing == []


def test_every_command_that_reads_images_for_a_model_takes_image_norm() -> None:
    """A model trained with fixed statistics (ImageNet's) is misjudged on data standardised with its own:
    every command reading --data or --calib can be told how (the built-in demo excepted)."""
    import argparse

    from graphprune.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    flags = {
        name: {f for a in command._actions for f in a.option_strings} for name, command in commands.items()
    }
    readers = {name for name, given in flags.items() if given & {"--data", "--calib"} and name != "demo"}
    assert {"eval", "finetune", "train", "prune", "criteria", "slim", "gate-decorator"} <= readers
    assert [name for name in sorted(readers) if "--image-norm" not in flags[name]] == []


def test_a_channels_last_model_is_evaluated_calibrated_and_fine_tuned_on_a_folder(tmp_path: Path) -> None:
    """Keras models through tf2onnx take [N, H, W, C]: a folder is fitted and laid out for them (it was
    refused as channels-first data of the wrong shape)."""
    from PIL import Image

    from graphprune.cli.main import main

    torch = pytest.importorskip("torch")
    from helpers import export_torch

    class ChannelsLast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16))
            self.head = torch.nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean((2, 3)))

    model = tmp_path / "nhwc.onnx"
    export_torch(ChannelsLast(), (1, 12, 12, 3), model)
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 256, size=(20, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / label / f"{index}.png")
    photos = str(tmp_path / "photos")
    assert main(["eval", str(model), "--data", photos]) == 0
    pruned = tmp_path / "pruned.onnx"
    calib = ["--calib", photos, "--calib-samples", "4", "--criterion", "mean_act", "--recover", "lsq"]
    assert main(["prune", str(model), "-o", str(pruned), "--ratio", "0.5", *calib]) == 0
    tuned = ["-o", str(tmp_path / "tuned.onnx"), "--data", photos, "--epochs", "1", "--batch-size", "4"]
    assert main(["finetune", str(pruned), *tuned]) == 0
