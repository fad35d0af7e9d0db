"""Network Slimming: the sparsity sub-gradient, sparsity training, the global |gamma| threshold, end to end."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphprune.cli.methods import register
from graphprune.data import load_dataset
from graphprune.errors import GraphPruneError
from graphprune.recipes.slimming import (
    BNSparsity,
    SlimmingConfig,
    Start,
    bn_l1,
    bn_layers,
    run_slimming,
    slim_prune,
)
from graphprune.torch_bridge.export import export
from graphprune.torch_bridge.train import TrainConfig, fit
from graphprune.zoo import build


class TinyNet(nn.Module):
    """Three conv-BN-ReLU layers and a linear head: small enough to train in a test."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        widths = (8, 16, 16)
        layers: list[nn.Module] = []
        for index, width in enumerate(widths):
            previous = in_channels if index == 0 else widths[index - 1]
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _gammas(module: nn.Module) -> np.ndarray:
    return np.concatenate([bn.weight.detach().cpu().numpy() for bn in bn_layers(module)])


def _config(**changes: object) -> TrainConfig:
    base = TrainConfig(
        epochs=1, batch_size=32, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, schedule="constant",
        augment=False, shuffle=False, device="cpu", progress=False,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_penalty_step_adds_lr_lambda_sign_to_gamma_update() -> None:
    data = load_dataset("synthetic:32")
    torch.manual_seed(0)
    plain = TinyNet()
    with torch.no_grad():
        for bn in bn_layers(plain):
            bn.weight.uniform_(-1.0, 1.0)
    penalised = copy.deepcopy(plain)
    start = _gammas(plain)
    lam = 0.05
    fit(plain, data, None, _config())
    fit(penalised, data, None, _config(), callbacks=[BNSparsity(lam)])
    moved_plain, moved_penalised = _gammas(plain) - start, _gammas(penalised) - start
    # One SGD step without momentum or decay: the penalty adds exactly -lr * lambda * sign(gamma).
    np.testing.assert_allclose(moved_penalised - moved_plain, -0.1 * lam * np.sign(start), atol=1e-6)
    assert np.abs(moved_penalised).sum() > np.abs(moved_plain).sum()


def test_sparsity_training_drives_gammas_toward_zero() -> None:
    data = load_dataset("synthetic:128")
    torch.manual_seed(0)
    reference = TinyNet()
    sparse = copy.deepcopy(reference)
    config = _config(epochs=3, momentum=0.9, shuffle=True)
    fit(reference, data, None, config, callbacks=[BNSparsity(0.0)])
    fit(sparse, data, None, config, callbacks=[BNSparsity(0.15)])
    dense_mean, sparse_mean = np.abs(_gammas(reference)).mean(), np.abs(_gammas(sparse)).mean()
    assert sparse_mean < 0.6 * dense_mean
    assert bn_l1(sparse).item() == pytest.approx(np.abs(_gammas(sparse)).sum(), rel=1e-5)


def test_global_threshold_is_the_papers_percentile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = build("vgg11_bn")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in bn_layers(module):  # layers on different scales, none entirely under the threshold
            scale = 0.5 + 3 * torch.rand(1, generator=generator)
            bn.weight.copy_(torch.randn(bn.num_features, generator=generator) * scale)
    model = export(module, torch.randn(1, 1, 28, 28), tmp_path / "vgg.onnx")
    ratio = 0.7
    result = slim_prune(model, ratio)
    everything = np.abs(_gammas(module))
    threshold = np.sort(everything)[int(everything.size * ratio)]
    widths = {init.name: init.dims[0] for init in result.model.graph.initializer}
    for name, bn in module.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert widths[f"{name}.weight"] == int((bn.weight.abs() >= threshold).sum()), name
    assert result.verification is not None


def test_no_layer_is_ever_emptied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyNet()
    with torch.no_grad():
        bn_layers(module)[1].weight.fill_(1e-6)  # the whole middle layer is under any threshold
    model = export(module, torch.randn(1, 1, 28, 28), tmp_path / "tiny.onnx")
    result = slim_prune(model, 0.6, min_channels=2)
    widths = [init.dims[0] for init in result.model.graph.initializer if init.name == "features.5.weight"]
    assert widths == [2]
    total = sum(bn.num_features for bn in bn_layers(module))
    assert result.removed.sum() == int(0.6 * total)  # the budget the layer keeps is taken elsewhere


class CountingTeacher:
    """A teacher answering with constant logits; counts the batches it scores."""

    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return torch.arange(10.0).expand(len(inputs), 10)


def test_slimming_end_to_end_gives_a_smaller_verified_model(tmp_path: Path) -> None:
    config = SlimmingConfig(
        start=Start(model="test_slimming:TinyNet", data="synthetic:128", val_limit=64),
        output=tmp_path / "slim.onnx",
        lam=1e-3,
        ratio=0.4,
        passes=2,
        epochs_sparse=1,
        epochs_finetune=1,
        train=_config(batch_size=64, momentum=0.9),
        workdir=tmp_path / "work",
    )
    teacher = CountingTeacher()
    result = run_slimming(config, teacher=teacher)
    assert teacher.batches == 2 * 2  # the two fine-tunes of 2 batches distil, sparsity training does not
    labels = [stage.label for stage in result.stages]
    assert labels == [
        "sparsity-trained", "pass 1 pruned", "pass 1 fine-tuned", "pass 2 pruned", "pass 2 fine-tuned"
    ]  # fmt: skip
    assert result.after.macs < result.stages[2].macs < result.before.macs
    assert result.after.params < result.before.params
    model = onnx.load(str(result.output))
    onnx.checker.check_model(model)
    assert sum(node.op_type == "BatchNormalization" for node in model.graph.node) == 3
    assert (tmp_path / "work" / "pruned2.plan.json").is_file()
    assert all(0.0 <= stage.accuracy <= 1.0 for stage in result.stages)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GraphPruneError, match="exactly one"):
        run_slimming(SlimmingConfig(start=Start(), output=tmp_path / "x.onnx"))
    with pytest.raises(GraphPruneError, match="ratio"):
        run_slimming(SlimmingConfig(start=Start(model="resnet20"), ratio=1.5, output=tmp_path / "x.onnx"))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="graphprune")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_slim_prints_before_and_after_and_writes_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "slim.onnx"
    argv = ["slim", "--model", "test_slimming:TinyNet", "--data", "synthetic:64", "--val-limit", "32"]
    argv += [
        "--epochs-sparse",
        "0",
        "--epochs-finetune",
        "0",
        "--ratio",
        "0.5",
        "--device",
        "cpu",
        "-o",
        str(output),
    ]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "start" in printed and "pass 1 pruned" in printed and "accuracy" in printed and "MACs" in printed
    assert output.is_file()
    with pytest.raises(GraphPruneError, match="overwrites its input"):
        _cli(["slim", "--onnx", str(output), "-o", str(output)])
