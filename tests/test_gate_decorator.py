"""Gate Decorator: gated BN folds exactly, Taylor scores, residual groups from the analysis, Tick-Tock."""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_slimming import CountingTeacher
from torch import nn

from graphprune.api import analyze_model
from graphprune.data import load_dataset
from graphprune.recipes.gate_decorator import (
    GatedBN,
    GateDecoratorConfig,
    GateMap,
    TaylorScores,
    add_gates,
    fold_gates,
    folded_copy,
    run_gate_decorator,
    tick_trainable,
)
from graphprune.recipes.workspace import Start
from graphprune.torch_bridge.export import export
from graphprune.torch_bridge.train import TrainConfig, fit
from graphprune.zoo import build


def _bn(channels: int = 6) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("training", [False, True])
def test_gated_bn_with_unit_gates_is_the_plain_bn(training: bool) -> None:
    bn = _bn().train(training)
    gated = GatedBN.from_bn(copy.deepcopy(bn))
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(gated(x), bn(x))
    assert not gated.weight.requires_grad and gated.gate.requires_grad  # the gate is the scale while gated


@pytest.mark.parametrize("training", [False, True])
def test_gates_fold_into_gamma_and_beta_exactly(training: bool) -> None:
    gated = GatedBN.from_bn(_bn()).train(training)
    with torch.no_grad():
        gated.gate.uniform_(-2, 2)
        gated.mask[2] = 0
    folded = gated.folded()
    assert type(folded) is nn.BatchNorm2d
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(folded(x), gated(x))
    torch.testing.assert_close(folded.weight, gated.weight * gated.gate * gated.mask)
    torch.testing.assert_close(folded.bias, gated.bias * gated.gate * gated.mask)
    assert folded.weight[2] == 0 and folded.bias[2] == 0


def test_gating_keeps_parameter_names_and_folding_leaves_no_new_op(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = build("resnet20").eval()
    gated = copy.deepcopy(plain)
    layers = add_gates(gated)
    assert len(layers) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    names = {n for n, _ in gated.named_parameters()}
    assert {n for n, _ in plain.named_parameters()} | {f"{n}.gate" for n in layers} == names
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(gated.eval()(x), plain(x))
    first = export(plain, x, tmp_path / "plain.onnx")
    second = export(folded_copy(gated), x, tmp_path / "folded.onnx")
    assert Counter(n.op_type for n in second.graph.node) == Counter(n.op_type for n in first.graph.node)


def test_taylor_scores_sum_and_abs() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3), GatedBN(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    data = load_dataset("synthetic:64")
    config = TrainConfig(
        epochs=1, batch_size=16, lr=0.1, augment=False, shuffle=False, device="cpu", progress=False
    )
    scores = {mode: TaylorScores(mode) for mode in ("sum", "abs")}
    for scorer in scores.values():
        fit(copy.deepcopy(module), data, None, config, callbacks=[scorer])
    signed, absolute = scores["sum"].scores()["1"], scores["abs"].scores()["1"]
    assert signed.shape == (4,) and (absolute > 0).all()
    assert (signed <= absolute + 1e-12).all() and (signed < absolute - 1e-9).any()  # 4 batches disagree


def test_tick_freezes_everything_but_gates_and_the_classifier() -> None:
    module = build("resnet20")
    add_gates(module)
    with tick_trainable(module):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.named_parameters() if n.endswith(".gate")} | {
        "fc.weight",
        "fc.bias",
    }
    assert any(p.requires_grad for n, p in module.named_parameters() if n.startswith("conv1"))


def test_residual_groups_share_one_gate_pattern(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = build("resnet20")
    layers = add_gates(module)
    dep = analyze_model(export(folded_copy(module), torch.randn(1, 1, 28, 28), tmp_path / "r.onnx"))
    widths = {name: layer.num_features for name, layer in layers.items()}
    gate_map = GateMap.build(dep, layers, widths, min_keep=0.1)
    stream = next(g for g in gate_map.groups if g.name == "/conv1/Conv")
    assert {n for n, _ in stream.pairs[0]} == {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"}
    assert stream.floor == 2  # ceil(10% of 16)
    scores = {name: np.ones(layer.num_features) for name, layer in layers.items()}
    per_class = gate_map.class_scores(scores, layers, eta=0.0)
    assert per_class[gate_map.groups.index(stream)][0] == 4.0  # the sum over the four tied BNs
    scores["bn1"][5] = -10.0  # make channel 5 of the stream the lowest everywhere
    per_class = gate_map.class_scores(scores, layers, eta=0.0)
    assert gate_map.mask_lowest(layers, per_class, budget=1) == 4
    for name in ("bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"):
        assert layers[name].mask[5] == 0 and layers[name].mask.sum() == 15
    assert gate_map.predicted_macs(layers) < gate_map.cost.macs


def test_tick_tock_prunes_and_folds_the_gates_away(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = export(build("resnet20"), torch.randn(1, 1, 28, 28), tmp_path / "plain.onnx")
    config = GateDecoratorConfig(
        start=Start(model="resnet20", data="synthetic:64", val_limit=32),
        output=tmp_path / "gd.onnx",
        target_flops=0.9,
        ticks=2,
        tick_subset=0.5,
        tick_share=0.04,
        epochs_baseline=0,
        epochs_tock=1,
        epochs_finetune=1,
        train=TrainConfig(batch_size=32, lr=0.05, device="cpu", progress=False),
        workdir=tmp_path / "work",
    )
    teacher = CountingTeacher()
    result = run_gate_decorator(config, teacher=teacher)
    assert teacher.batches >= 2  # at least the final fine-tune (2 batches) distils
    assert result.after.macs <= result.target_macs < result.before.macs
    assert sum(result.masked) > 0
    assert any(stage.label.endswith("pruned") for stage in result.stages)
    final = onnx.load(str(result.output))
    onnx.checker.check_model(final)
    ops = Counter(node.op_type for node in final.graph.node)
    assert ops == Counter(node.op_type for node in plain.graph.node)  # no gate op, no extra Mul
    assert "Mul" not in ops
    assert not any("gate" in init.name or "mask" in init.name for init in final.graph.initializer)
    assert len(final.graph.node) == len(plain.graph.node)

    def bn_widths(model: onnx.ModelProto) -> dict[str, int]:
        inits = {i.name: i.dims[0] for i in model.graph.initializer}
        return {n.input[1]: inits[n.input[1]] for n in model.graph.node if n.op_type == "BatchNormalization"}

    before, after = bn_widths(plain), bn_widths(final)
    assert before.keys() == after.keys() and sum(after.values()) < sum(before.values())
    assert all(after[name] >= np.ceil(0.1 * before[name]) for name in before)  # min_keep 10%


def test_fold_gates_replaces_every_gated_layer() -> None:
    module = build("resnet20")
    add_gates(module)
    fold_gates(module)
    assert not any(isinstance(m, GatedBN) for m in module.modules())
    assert not any(n.endswith(".gate") for n, _ in module.named_parameters())


def test_cli_gate_decorator_passes_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import graphprune.recipes.gate_decorator as gd
    from graphprune.cli.methods import register
    from graphprune.recipes.workspace import RecipeResult, Stage

    seen: list[GateDecoratorConfig] = []

    def fake_run(config: GateDecoratorConfig, *, teacher: object) -> RecipeResult:
        assert teacher is None  # no --teacher given
        seen.append(config)
        stages = [
            Stage("start", tmp_path / "a.onnx", 0.9, 1000, 10),
            Stage("fine-tuned", config.output, 0.89, 300, 4),
        ]
        return RecipeResult(config.output, stages)

    monkeypatch.setattr(gd, "run_gate_decorator", fake_run)
    parser = argparse.ArgumentParser(prog="graphprune")
    register(parser.add_subparsers(dest="command", required=True))
    argv = [
        "gate-decorator",
        "--model",
        "resnet56",
        "--target-flops",
        "0.3",
        "--ticks",
        "7",
        "--tick-subset",
        "0.2",
    ]
    argv += [
        "--epochs-tock",
        "3",
        "--epochs-finetune",
        "4",
        "--score",
        "abs",
        "--flops-eta",
        "0.5",
        "--kd-weight",
        "0.25",
        "-o",
        "x.onnx",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    config = seen[0]
    assert (config.start.model, config.target_flops, config.ticks, config.tick_subset) == (
        "resnet56",
        0.3,
        7,
        0.2,
    )
    assert (config.epochs_tock, config.epochs_finetune, config.score, config.flops_eta) == (3, 4, "abs", 0.5)
    assert config.gate_lambda == 1e-3 and config.min_keep == 0.1 and config.output == Path("x.onnx")
    assert (config.train.kd_weight, config.train.kd_temperature) == (0.25, 4.0)
    printed = capsys.readouterr().out
    assert "fine-tuned" in printed and "89.00 %" in printed
    args = parser.parse_args([*argv, "--json"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)  # the stages as JSON, alone on stdout
    assert rows["fine-tuned"]["accuracy"] == 0.89 and rows["output"] == "x.onnx"
