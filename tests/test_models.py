"""End to end on real CNNs: the project zoo and torchvision classifiers, exported the way users ship them.

1. Legacy export (BN kept, dynamic batch), pruned from the file at two ratios: verified against the
   masked reference, fewer MACs, same output shape, runs at batch 3, input file untouched.
2. Dynamo export with weights in an external .data file (pruned from the path, saved with external data
   again, loaded by onnxruntime from disk) and BN-folded export (l1 works; criterion "bn" refuses clearly,
   except on DenseNets whose BN after a Concat cannot be folded and stays).
3. The `graphprune` command in a subprocess: analyze, prune, verify, replay, MACs target, round-to,
   exclude, bench, and bad inputs that must fail with one line on stderr and write nothing.

Models are exported once per session by the `exported` fixture (tests/conftest.py).  The default run
keeps every model at ratio 0.5 and nearly all at 0.3; `-m slow` adds the rest and the full dynamo and
folded-BN matrices.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import feed, init_shape, prune_checked, run, sha256

from graphprune.api import model_cost, prune
from graphprune.errors import PlanError
from graphprune.planning import PlanOptions

if TYPE_CHECKING:
    from conftest import ExportCache

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from graphprune.zoo import TORCHVISION_SUITE  # noqa: E402 - needs torch, checked just above

ZOO = ["resnet20", "resnet56", "vgg11_bn", "mobilenetv2", "densenet_bc40", "regnetx"]
TORCHVISION = [f"torchvision:{arch}" for arch in TORCHVISION_SUITE]
MODELS = ZOO + TORCHVISION
# Export + prune + check above ~20 s on one core (torchvision VGG needs 224x224 input and has a
# 25088x4096 classifier): their second ratio runs only with -m slow.
HEAVY = {"torchvision:vgg11_bn", "torchvision:wide_resnet50_2"}
# Representative of the architectures users bring (residual, depthwise, channel shuffle + split,
# dense concat, LayerNorm + layer scale); Torch-Pruning fails or prunes nothing on the last two.
REPRESENTATIVE = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:densenet121",
    "torchvision:convnext_tiny",
]


def slow_unless(default: bool) -> tuple[pytest.MarkDecorator, ...]:
    return () if default else (pytest.mark.slow,)


def representative_by_default() -> list[object]:
    """Every model; those outside REPRESENTATIVE only with -m slow."""
    return [pytest.param(name, marks=slow_unless(name in REPRESENTATIVE), id=name) for name in MODELS]


def max_kept(ratio: float) -> float:
    """A bound on the MACs kept at a ratio: removing a fraction r of every group's channels keeps about
    (1-r)^2 of a conv's MACs; 1 - r/2 leaves room for blocked groups and fixed stems and heads, and still
    fails a planner that prunes next to nothing (Torch-Pruning on shufflenet_v2 and convnext)."""
    return 1.0 - ratio / 2


def bn_count(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)


# 1. legacy export, both ratios ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "ratio"),
    [
        pytest.param(name, ratio, marks=slow_unless(ratio == 0.5 or name not in HEAVY), id=f"{name}-{ratio}")
        for name in MODELS
        for ratio in (0.5, 0.3)
    ],
)
def test_prune_exported_model(name: str, ratio: float, exported: ExportCache) -> None:
    """prune_checked: verified, checker-clean, equal to the masked reference at batch 3 with the
    original's output shapes, fewer parameters."""
    path = exported(name)
    digest = sha256(path)
    result = prune_checked(path, ratio, batch=3)
    assert result.dep.prunable_groups, f"{name}: no prunable group found"
    assert result.after.macs < result.before.macs
    kept = result.after.macs / result.before.macs
    assert kept < max_kept(ratio), f"{name} keeps {kept:.1%} of its MACs at ratio {ratio}"
    assert sha256(path) == digest


# 1b. grouped convs losing whole conv groups ---------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "round_to"),
    [
        pytest.param("regnetx", 16, id="regnetx"),
        pytest.param("torchvision:regnet_x_400mf", 16, id="regnet_x_400mf"),
        pytest.param("torchvision:resnext50_32x4d", 32, marks=pytest.mark.slow, id="resnext50_32x4d"),
    ],
)
def test_conv_groups_go_whole(name: str, round_to: int, exported: ExportCache) -> None:
    """RegNet's and ResNeXt's grouped convs, with widths rounded to whole conv groups (16 channels per
    conv group in RegNet, 4 to 32 in ResNeXt), lose whole conv groups: each keeps its input width per
    conv group, and the pruned model is exact."""
    path = exported(name)
    result = prune_checked(path, PlanOptions(ratio=0.5, round_to=round_to), batch=3)
    assert len(result.dep.droppable) == len(result.dep.grouped_convs) > 0

    def grouped(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
        weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
        return {
            node.name: (next(a.i for a in node.attribute if a.name == "group"), weights[node.input[1]][1])
            for node in model.graph.node
            if node.name in result.dep.droppable
        }

    before, after = grouped(result.dep.model), grouped(result.model)
    assert all(
        after[node][1] == width and after[node][0] <= groups for node, (groups, width) in before.items()
    )
    assert sum(after[node][0] for node in after) < sum(groups for groups, _ in before.values())


# 2a. dynamo exporter, weights in an external data file ---------------------------------------------
@pytest.mark.parametrize("name", representative_by_default())
def test_dynamo_external_data(name: str, exported: ExportCache, tmp_path: Path) -> None:
    source = exported(name, exporter="dynamo", external_data=True)
    data = source.with_name(source.name + ".data")
    assert data.is_file()
    digests = (sha256(source), sha256(data))

    result = prune(source, PlanOptions(ratio=0.5))
    assert result.verification is not None and result.verification.ok
    assert result.external_data
    assert result.after.macs < result.before.macs
    assert result.after.macs / result.before.macs < max_kept(0.5)

    written = result.save(tmp_path / "pruned.onnx", tmp_path / "pruned.plan.json")
    assert (tmp_path / "pruned.onnx.data").is_file()
    assert (tmp_path / "pruned.plan.json").is_file()
    header = onnx.load(str(written), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in header.graph.initializer)
    onnx.checker.check_model(str(written))

    inputs = feed(header, 3, seed=5)
    (original,) = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, inputs)
    (from_disk,) = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"]).run(None, inputs)
    (in_memory,) = run(result.model, inputs)
    assert from_disk.shape == original.shape and from_disk.shape[0] == 3
    np.testing.assert_array_equal(from_disk, in_memory)
    assert (sha256(source), sha256(data)) == digests


# 2b. BatchNorm folded into the convs ---------------------------------------------------------------
@pytest.mark.parametrize("name", representative_by_default())
def test_folded_batchnorm(name: str, exported: ExportCache) -> None:
    path = exported(name, fold_bn=True)
    result = prune_checked(path, 0.5, criterion="l1", batch=3)
    assert result.after.macs / result.before.macs < max_kept(0.5)
    left, unfolded = bn_count(path), bn_count(exported(name))
    assert left < unfolded or unfolded == 0, f"{name}: no BatchNormalization was folded"
    if left == 0:
        with pytest.raises(PlanError, match="no BatchNormalization"):
            prune(path, PlanOptions(ratio=0.5), criterion="bn")
    else:
        # BN after a Concat (DenseNet's pre-activation) has no conv to fold into; the bn criterion reads it.
        assert "densenet" in name
        assert prune(path, PlanOptions(ratio=0.5), criterion="bn").removed.any()


# 3. the command line -------------------------------------------------------------------------------
def graphprune(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graphprune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def ok(process: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert process.returncode == 0, process.stderr
    return process


def conv_widths(path: Path) -> dict[str, int]:
    """Output channels of every Conv, by weight name."""
    model = onnx.load(str(path))
    return {
        node.input[1]: init_shape(model, node.input[1])[0]
        for node in model.graph.node
        if node.op_type == "Conv"
    }


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {init.name: onnx.numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def cli_dir(exported: ExportCache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding model.onnx (ResNet-20, legacy export) and, pruned at 0.5 by the CLI, half.onnx with
    its plan half.plan.json."""
    folder = tmp_path_factory.mktemp("cli")
    shutil.copy(exported("resnet20"), folder / "model.onnx")
    ok(graphprune("prune", folder / "model.onnx", "-o", folder / "half.onnx", "--ratio", "0.5",
                  "--plan-out", folder / "half.plan.json"))  # fmt: skip
    return folder


def test_cli_analyze_text_and_json(cli_dir: Path) -> None:
    text = ok(graphprune("analyze", cli_dir / "model.onnx")).stdout
    assert text.startswith("model.onnx  opset 17")
    assert "groups: 12 prunable" in text
    summary = json.loads(ok(graphprune("analyze", cli_dir / "model.onnx", "--json")).stdout)
    cost = model_cost(onnx.load(str(cli_dir / "model.onnx")))
    assert (summary["macs"], summary["params"]) == (cost.macs, cost.params)
    assert summary["dynamic_batch"] is True
    assert summary["prunable_groups"] == 12
    assert sum(g["prunable"] for g in summary["groups"] if g["prunable"] > 1) == summary["prunable_channels"]
    assert list(summary["blocked_nodes"]) == ["output output"]
    image = {"channels": 1, "height": 28, "width": 28, "channels_last": False}
    assert (summary["image_input"], summary["image_norm"]) == (image, None)  # an export records none
    assert "image input: 1x28x28 channels-first, normalisation not recorded" in text


def test_cli_prune_verify_and_replay(cli_dir: Path, tmp_path: Path) -> None:
    original, pruned, plan = cli_dir / "model.onnx", cli_dir / "half.onnx", cli_dir / "half.plan.json"
    before, after = model_cost(onnx.load(str(original))), model_cost(onnx.load(str(pruned)))
    assert after.macs < 0.5 * before.macs and after.params < before.params
    assert json.loads(plan.read_text())["remove"]

    assert (
        "equal to the masked reference" in ok(graphprune("verify", original, pruned, "--plan", plan)).stdout
    )
    verified = json.loads(ok(graphprune("verify", original, pruned, "--plan", plan, "--json")).stdout)
    assert verified["ok"] and verified["max_rel_error"] <= verified["tolerance"] and verified["tensors"] > 0

    replayed = tmp_path / "replayed.onnx"
    ok(graphprune("prune", original, "-o", replayed, "--plan", plan))
    first, second = initializers(pruned), initializers(replayed)
    assert first.keys() == second.keys()
    for name, values in first.items():
        np.testing.assert_array_equal(second[name], values, err_msg=name)

    other = tmp_path / "other.plan.json"
    ok(graphprune("prune", original, "-o", tmp_path / "third.onnx", "--ratio", "0.3", "--plan-out", other))
    mismatch = graphprune("verify", original, pruned, "--plan", other)
    assert mismatch.returncode == 2
    assert mismatch.stderr.startswith("graphprune: error:")


def test_cli_target_macs(cli_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "target.onnx"
    ok(graphprune("prune", cli_dir / "model.onnx", "-o", out, "--target-macs", "0.5"))
    kept = model_cost(onnx.load(str(out))).macs / model_cost(onnx.load(str(cli_dir / "model.onnx"))).macs
    assert 0.3 < kept <= 0.5


def test_cli_round_to(cli_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "round.onnx"
    ok(graphprune("prune", cli_dir / "model.onnx", "-o", out, "--ratio", "0.3", "--round-to", "8"))
    before, after = conv_widths(cli_dir / "model.onnx"), conv_widths(out)
    assert after != before
    # ResNet-20 widths are 16/32/64: every kept count can be a multiple of 8.
    assert all(width % 8 == 0 for width in after.values()), after


def test_cli_exclude_keeps_the_node(cli_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exclude.onnx"
    ok(graphprune("prune", cli_dir / "model.onnx", "-o", out, "--ratio", "0.5",
                  "--exclude", "/layer1/layer1.0/conv1/Conv"))  # fmt: skip
    before, after = conv_widths(cli_dir / "model.onnx"), conv_widths(out)
    assert after["layer1.0.conv1.weight"] == before["layer1.0.conv1.weight"] == 16
    assert after["layer1.1.conv1.weight"] < before["layer1.1.conv1.weight"]


def test_cli_bench_prints_a_table(cli_dir: Path) -> None:
    table = ok(graphprune("bench", cli_dir / "model.onnx", cli_dir / "half.onnx", "--batch", "1,2",
                          "--threads", "1", "--warmup", "1", "--runs", "3")).stdout  # fmt: skip
    assert "speed-up" in table
    rows = [line for line in table.splitlines() if ".onnx" in line]
    assert len(rows) == 4
    assert {row.split()[1] for row in rows if "model.onnx" in row} == {"1", "2"}


def lrn_model() -> onnx.ModelProto:
    """conv -> BN -> Relu (8 ch) -> LRN -> conv (8 ch) -> Relu -> conv: LRN normalises across channels
    and has no rule, so it blocks the stem's group; the head's group stays prunable."""
    from helpers import Net

    net = Net(channels=3, size=8)
    return net.build(net.head(net.op("LRN", [net.stem(8)], size=3)))


def test_cli_unruled_op_blocks_only_its_group(tmp_path: Path) -> None:
    source, out = tmp_path / "lrn.onnx", tmp_path / "lrn.pruned.onnx"
    onnx.save(lrn_model(), str(source))
    assert "LRN" in ok(graphprune("analyze", source)).stdout
    ok(graphprune("prune", source, "-o", out, "--ratio", "0.5"))
    before, after = conv_widths(source), conv_widths(out)
    stem, inner, _ = before
    assert after[stem] == before[stem] == 8
    assert after[inner] == 4


def bad_input(kind: str, folder: Path, model: Path) -> tuple[Path, list[str]]:
    """A broken input of the given kind and the extra prune arguments to use with it."""
    path = folder / f"{kind}.onnx"
    if kind == "truncated":
        data = model.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is a README, not an ONNX model\n")
    elif kind == "custom-op":
        proto = lrn_model()
        node = next(node for node in proto.graph.node if node.op_type == "LRN")
        node.op_type, node.domain = "Frobnicate", "com.example"
        del node.attribute[:]
        proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        onnx.save(proto, str(path))
    else:
        shutil.copy(model, path)
    return path, ["--ratio", "1.5" if kind == "ratio" else "0.5"]


@pytest.mark.parametrize("kind", ["truncated", "text", "custom-op", "ratio"])
def test_cli_bad_input_fails_cleanly(kind: str, cli_dir: Path, tmp_path: Path) -> None:
    source, args = bad_input(kind, tmp_path, cli_dir / "model.onnx")
    digest = sha256(source)
    out = tmp_path / "out.onnx"
    process = graphprune("prune", source, "-o", out, *args)
    assert process.returncode == 2
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphprune: error: "), process.stderr
    assert process.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]
    assert sha256(source) == digest
