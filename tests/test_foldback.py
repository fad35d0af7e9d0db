"""Fold-back of pruned graphs into PyTorch, both ways, equal to the pruned graph before any training."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from test_train import tiny_cnn
from torch import nn

from graphprune.api import PruneResult, prune
from graphprune.data import load_dataset
from graphprune.errors import UnsupportedModelError, VerificationError
from graphprune.planning import PlanOptions
from graphprune.torch_bridge.export import export
from graphprune.torch_bridge.foldback import apply_to_module, onnx_to_module, verify_foldback
from graphprune.torch_bridge.train import TrainConfig, fit
from graphprune.zoo import build

MODELS = ("resnet20", "mobilenetv2", "densenet_bc40")


@dataclass
class Pruned:
    module: nn.Module
    result: PruneResult


@pytest.fixture(scope="module", params=MODELS)
def pruned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pruned:
    """A zoo model with non-trivial BN statistics, exported and pruned at ratio 0.5."""
    torch.manual_seed(0)
    module = build(request.param)
    module.train()
    with torch.no_grad():  # running statistics away from (0, 1), so BN folding errors would show
        module(torch.randn(8, 1, 28, 28) * 2 + 0.5)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export(module, torch.zeros(1, 1, 28, 28), path)
    result = prune(path, PlanOptions(ratio=0.5))
    assert result.after.params < result.before.params
    return Pruned(module, result)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_params(model: onnx.ModelProto) -> int:
    """Trainable values of the graph: Conv/Gemm weights and biases, BN gamma and beta."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    trainable = {"Conv": 3, "Gemm": 3, "BatchNormalization": 3}
    return sum(
        sizes.get(name, 0)
        for node in model.graph.node
        if node.op_type in trainable
        for name in node.input[1 : trainable[node.op_type]]
    )


def test_apply_to_module_matches_pruned_graph(pruned: Pruned) -> None:
    original = pruned.module
    folded = apply_to_module(copy.deepcopy(original), pruned.result.model)
    assert type(folded) is type(original)
    assert _count(folded) == _layer_params(pruned.result.model) < _count(original)
    shapes = {init.name: tuple(init.dims) for init in pruned.result.model.graph.initializer}
    for name, parameter in folded.named_parameters():
        assert tuple(parameter.shape) == shapes[name]
    for name, layer in folded.named_modules():
        if isinstance(layer, nn.Conv2d):
            assert tuple(layer.weight.shape) == shapes[f"{name}.weight"]
            assert layer.out_channels == layer.weight.shape[0]
            assert layer.in_channels == layer.weight.shape[1] * layer.groups
        elif isinstance(layer, nn.BatchNorm2d):
            assert layer.num_features == layer.weight.shape[0] == layer.running_var.shape[0]
            assert layer.weight.requires_grad
    assert verify_foldback(folded, pruned.result.model) < 1e-4


def test_onnx_to_module_matches_pruned_graph(pruned: Pruned) -> None:
    module = onnx_to_module(pruned.result.model)
    batchnorms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_nodes = [n for n in pruned.result.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(batchnorms) == len(bn_nodes) > 0
    parameters = {id(p) for p in module.parameters()}
    for bn in batchnorms:
        assert bn.weight.requires_grad and bn.bias.requires_grad
        assert id(bn.weight) in parameters and id(bn.bias) in parameters
    assert _count(module) == _layer_params(pruned.result.model)
    assert verify_foldback(module, pruned.result.model) < 1e-4


def _small(tmp_path: Path, module: nn.Module) -> PruneResult:
    """Export a small module (28x28 single-channel input) and prune it at ratio 0.5."""
    model = export(module, torch.zeros(1, 1, 28, 28), tmp_path / "small.onnx")
    return prune(model, PlanOptions(ratio=0.5))


def _depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 28 * 28, 10),
    )


def test_depthwise_groups_follow_the_graph(tmp_path: Path) -> None:
    """A depthwise conv pruned to fewer channels keeps groups == channels in the folded module."""
    module = _depthwise_net()
    result = _small(tmp_path, module)
    folded = apply_to_module(copy.deepcopy(module), result.model)
    depthwise = folded[3]
    assert depthwise.groups == depthwise.out_channels == depthwise.in_channels == 4
    assert folded[8].in_features == 2 * 28 * 28
    assert verify_foldback(folded, result.model) < 1e-4


def test_onnx_to_module_cleans_identity_on_gamma(tmp_path: Path) -> None:
    """onnx2torch turns a BN reading an Identity output into a functional op with frozen gamma; the
    clean-up first makes it a trainable nn.BatchNorm2d."""
    from onnx2torch import convert

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3)
    )
    model = export(module, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    gamma = next(init for init in model.graph.initializer if init.name == bn.input[1])
    gamma.name = "shared_gamma"  # read through an Identity, as the legacy exporter shares equal tensors
    model.graph.node.insert(0, helper.make_node("Identity", ["shared_gamma"], [bn.input[1]], name="share"))

    raw = convert(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in raw.modules())
    folded = onnx_to_module(model)
    (batchnorm,) = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorm.weight.requires_grad and any(p is batchnorm.weight for p in folded.parameters())
    assert verify_foldback(folded, model) < 1e-4


def test_apply_to_module_rejects_an_unrelated_module(tmp_path: Path) -> None:
    result = _small(tmp_path, _depthwise_net())
    with pytest.raises(UnsupportedModelError, match="No initializer"):
        apply_to_module(nn.ModuleDict({"stem": nn.Conv2d(1, 4, 3)}), result.model)


def test_verify_foldback_catches_a_wrong_module(tmp_path: Path) -> None:
    module = _depthwise_net()
    result = _small(tmp_path, module)
    folded = apply_to_module(copy.deepcopy(module), result.model)
    with torch.no_grad():
        folded[8].bias.add_(1.0)
    with pytest.raises(VerificationError, match="differs from the pruned graph"):
        verify_foldback(folded, result.model)


def _tiny_bn_cnn() -> nn.Module:
    """Conv-BN-ReLU twice, global average pooling (ReduceMean-18 from the dynamo exporter), a head;
    its BN statistics are moved away from (0, 1) so that a wrong BN fold would show."""
    module = tiny_cnn(0).train()
    with torch.no_grad():
        module(torch.randn(8, 1, 28, 28) * 2 + 0.5)
    return module.eval()


def _plain_export(module: nn.Module, path: Path, *, dynamo: bool) -> Path:
    """What users ship: torch.onnx.export with its defaults (BN folded into the convs, opset 18+ for dynamo),
    the batch dynamic so the model trains at any batch size."""
    dynamic = {"x": {0: "batch"}}
    torch.onnx.export(
        module, (torch.zeros(2, 1, 28, 28),), path, dynamo=dynamo, input_names=["x"], dynamic_axes=dynamic
    )
    return path


def _folds_back_and_trains(model: onnx.ModelProto | Path) -> None:
    """Prune at ratio 0.5, fold back with onnx2torch, check equality, and take one SGD step."""
    result = prune(model, PlanOptions(ratio=0.5))
    assert result.after.params < result.before.params
    module = onnx_to_module(result.model)
    assert verify_foldback(module, result.model) < 1e-4
    before = [p.detach().clone() for p in module.parameters()]
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, schedule="constant", progress=False)
    fit(module, load_dataset("synthetic:16"), None, config)
    assert any(not torch.equal(p.detach(), old) for p, old in zip(module.parameters(), before, strict=True))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_plain_torch_export_folds_back(tmp_path: Path, dynamo: bool) -> None:
    """torch.onnx.export's defaults fold BN; the dynamo one also emits ReduceMean-18, which onnx2torch
    1.5.15 has no converter for unless the graph is brought down to opset 17 first."""
    path = _plain_export(_tiny_bn_cnn(), tmp_path / "plain.onnx", dynamo=dynamo)
    model = onnx.load(path)
    assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)
    if dynamo:
        assert any(node.op_type == "ReduceMean" for node in model.graph.node)
        assert model.opset_import[0].version >= 18
    _folds_back_and_trains(path)


def test_plain_dynamo_export_of_resnet20_folds_back(tmp_path: Path) -> None:
    module = build("resnet20").eval()
    _folds_back_and_trains(_plain_export(module, tmp_path / "resnet20.onnx", dynamo=True))


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-kept", "bn-folded"])
def test_dynamo_export_with_external_data_folds_back(tmp_path: Path, fold_bn: bool) -> None:
    path = tmp_path / "model.onnx"
    export(
        _tiny_bn_cnn(),
        torch.zeros(1, 1, 28, 28),
        path,
        exporter="dynamo",
        fold_bn=fold_bn,
        external_data=True,
    )
    assert (tmp_path / "model.onnx.data").is_file()
    _folds_back_and_trains(path)


def test_simplified_export_folds_back(tmp_path: Path) -> None:
    """onnxslim's output (constants folded, ops fused) of a plain dynamo export."""
    onnxslim = pytest.importorskip("onnxslim")
    path = _plain_export(_tiny_bn_cnn(), tmp_path / "plain.onnx", dynamo=True)
    _folds_back_and_trains(onnxslim.slim(onnx.load(path)))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_dynamo_export_without_dynamic_shapes_folds_back_batch_free(tmp_path: Path, batch: int) -> None:
    """torch.onnx.export(dynamo=True)'s default writes Reshape(x, [N, 16]) for the export's batch N; the
    fold-back reads it as [0, 16] (the input's own batch), so the module trains at any batch."""
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(_tiny_bn_cnn(), (torch.zeros(batch, 1, 28, 28),), path, dynamo=True)
    model = onnx.load(path)
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert [constants[n.input[1]][0] for n in reshapes] == [batch]  # the batch spelled out
    _folds_back_and_trains(path)  # verify_foldback: equal at N, and it runs at N + 1


class _BatchIntoFeatures(nn.Module):
    """Splits each sample over two rows (Reshape(x, [4, 72]) at batch 2): at batch 3 it answers for 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(4, -1).mean(dim=1, keepdim=True)


def test_a_graph_that_mixes_its_fixed_batch_into_other_axes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.onnx"
    torch.onnx.export(
        nn.Sequential(nn.Conv2d(1, 4, 3), _BatchIntoFeatures()), (torch.zeros(2, 1, 8, 8),), path, dynamo=True
    )
    module = onnx_to_module(path)
    with pytest.raises(UnsupportedModelError, match="fixed batch of 2.*dynamic batch"):
        verify_foldback(module, path)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_apply_to_module_refuses_a_graph_with_folded_bn(tmp_path: Path, dynamo: bool) -> None:
    """Before: the user's BN layers kept their widths while the convs shrank (an internal RuntimeError)."""
    module = _tiny_bn_cnn()
    result = prune(_plain_export(module, tmp_path / "plain.onnx", dynamo=dynamo), PlanOptions(ratio=0.5))
    with pytest.raises(UnsupportedModelError, match="BatchNorm was folded.*export with BN kept") as caught:
        apply_to_module(copy.deepcopy(module), result.model)
    assert "\n" not in str(caught.value)


def test_fold_back_exports_onnx2torch_shape_modules_after_a_dynamo_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dynamo export imports torch.onnx.symbolic_helper by name, a compatibility module without the
    export's GLOBALS; onnx2torch, imported after it, read the export opset there, so every later
    fold-back of a graph with a Shape (a flatten at a dynamic batch) failed with an AttributeError."""
    import importlib

    from helpers import export_torch
    from onnx2torch.utils import common

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x))).view(x.size(0), -1))

    proto = export_torch(Flat(), (2, 1, 8, 8), tmp_path / "flat.onnx")
    assert any(node.op_type == "Shape" for node in proto.graph.node)
    monkeypatch.setattr(common, "symbolic_helper", importlib.import_module("torch.onnx.symbolic_helper"))
    module = onnx_to_module(proto)
    assert verify_foldback(module, proto) < 1e-5
