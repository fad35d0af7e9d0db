"""torch -> ONNX export: BN kept, parameter names kept, dynamic batch, BN folding, dynamo + external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from graphprune.errors import GraphPruneError
from graphprune.model_io import fold_constants
from graphprune.torch_bridge.export import export, remove_unused_initializers
from graphprune.zoo import build


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build("resnet20")


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _bn_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _assert_matches_torch(session: ort.InferenceSession, module: nn.Module) -> None:
    """Batch 1 and batch 3 through onnxruntime equal the module's eval output."""
    module = module.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = module(x).numpy()
        (actual,) = session.run(None, {"input": x.numpy()})
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_legacy_keeps_bn_names_and_dynamic_batch(resnet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "r20.onnx"
    model = export(resnet, torch.randn(1, 1, 28, 28), path)
    onnx.checker.check_model(model, full_check=True)
    assert _ops(model).count("BatchNormalization") == _bn_count(resnet) == 21
    assert "Identity" not in _ops(model)
    expected = {name for name in resnet.state_dict() if not name.endswith("num_batches_tracked")}
    assert {init.name for init in model.graph.initializer} == expected
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    assert list(bn.input[1:]) == [f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    np.testing.assert_array_equal(
        inits["layer1.0.conv1.weight"], resnet.layer1[0].conv1.weight.detach().numpy()
    )
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.onnx"]  # no temp files left behind
    _assert_matches_torch(ort.InferenceSession(str(path)), resnet)


def test_export_leaves_the_module_untouched(tmp_path: Path) -> None:
    module = build("resnet20").train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    export(module, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", fold_bn=True)
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert _bn_count(module) == 21


def test_fold_bn_removes_every_bn_after_a_conv(resnet: nn.Module, tmp_path: Path) -> None:
    # Trained-looking BN statistics, so folding actually changes the weights.
    module = build("resnet20").eval()
    generator = torch.Generator().manual_seed(1)
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.5, generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        bn.weight.data.uniform_(0.5, 1.5, generator=generator)
    model = export(module, torch.randn(1, 1, 28, 28), tmp_path / "fused.onnx", fold_bn=True)
    assert "BatchNormalization" not in _ops(model)
    assert _ops(model).count("Conv") == 21
    assert all(len(node.input) == 3 for node in model.graph.node if node.op_type == "Conv")
    _assert_matches_torch(ort.InferenceSession(model.SerializeToString()), module)


def test_fold_bn_keeps_bn_without_a_preceding_conv(tmp_path: Path) -> None:
    densenet = build("densenet_bc40")
    model = export(densenet, torch.randn(1, 1, 28, 28), tmp_path / "d.onnx", fold_bn=True)
    # The 18 BNs right after a bottleneck 1x1 conv fold; the 21 pre-activation BNs after a Concat stay.
    assert _ops(model).count("BatchNormalization") == 21


def test_dynamo_external_data_keeps_bn(resnet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "r20.onnx"
    model = export(resnet, torch.randn(1, 1, 28, 28), path, exporter="dynamo", external_data=True)
    data = tmp_path / "r20.onnx.data"
    assert data.is_file() and data.stat().st_size > 4 * 250_000  # ~270k float32 parameters
    assert path.stat().st_size < data.stat().st_size / 4  # the graph (and its provenance metadata) only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.onnx", "r20.onnx.data"]
    assert _ops(model).count("BatchNormalization") == 21
    assert "Identity" not in _ops(model)
    names = {init.name for init in model.graph.initializer}
    assert {name for name, _ in resnet.named_parameters()} <= names
    assert model.opset_import[0].version >= 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    raw = onnx.load(str(path), load_external_data=False)
    external = {
        init.name for init in raw.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
    }
    assert "layer3.2.conv2.weight" in external
    assert all(
        numpy_helper.to_array(init).nbytes < 1024
        for init in raw.graph.initializer
        if init.name not in external
    )
    _assert_matches_torch(ort.InferenceSession(str(path)), resnet)


class _ZeroInit(nn.Module):
    """Parameters whose fresh values look like no-ops: a zero bias, a unit gate, a zero linear bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.fc = nn.Linear(4, 3)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))) * self.gate
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_no_op_looking_parameters_survive(exporter: str, tmp_path: Path) -> None:
    module = _ZeroInit()
    model = export(module, torch.randn(2, 1, 28, 28), tmp_path / "z.onnx", exporter=exporter)
    names = {init.name for init in model.graph.initializer}
    assert {name for name, _ in module.named_parameters()} <= names
    assert {"bn.running_mean", "bn.running_var"} <= names
    assert "Mul" in _ops(model) and "BatchNormalization" in _ops(model)
    _assert_matches_torch(ort.InferenceSession(model.SerializeToString()), module)


def test_static_batch(tmp_path: Path) -> None:
    model = export(_ZeroInit(), torch.randn(2, 1, 28, 28), tmp_path / "s.onnx", dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_bad_arguments(resnet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(GraphPruneError, match="exporter"):
        export(resnet, torch.randn(1, 1, 28, 28), tmp_path / "x.onnx", exporter="jit")  # type: ignore[arg-type]
    with pytest.raises(GraphPruneError, match="torch.Tensor"):
        export(resnet, np.zeros((1, 1, 28, 28)), tmp_path / "x.onnx")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_identity_on_initializer_becomes_a_named_initializer() -> None:
    weight = numpy_helper.from_array(np.ones(4, dtype=np.float32), "bn.weight")
    unused = numpy_helper.from_array(np.zeros(2, dtype=np.float32), "stale")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["bn.weight"], ["bn.running_var"]),
            helper.make_node("Mul", ["x", "bn.running_var"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [weight, unused],
    )
    model = helper.make_model(graph)
    assert fold_constants(model, frozenset({"Identity"})) == 1
    assert [init.name for init in model.graph.initializer] == ["stale", "bn.running_var"]  # bn.weight went
    assert remove_unused_initializers(model) == 1  # "stale": no folded node read it
    assert _ops(model) == ["Mul"]
    (var,) = model.graph.initializer
    assert var.name == "bn.running_var"
    np.testing.assert_array_equal(numpy_helper.to_array(var), np.ones(4, dtype=np.float32))
    onnx.checker.check_model(model)


def test_folding_keeps_an_initializer_that_another_node_or_a_subgraph_still_reads() -> None:
    """Only initializers that nothing but folded nodes read leave with the fold; a reader elsewhere in
    the graph, or inside an If branch, keeps it."""
    shared = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "w_shared")
    branch_only = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "w_branch")
    alone = numpy_helper.from_array(np.ones((2, 3), dtype=np.float32), "w_alone")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w_branch"], ["b_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b_out", onnx.TensorProto.FLOAT, [2, 3])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["w_shared"], ["t_shared"], perm=[1, 0]),
            helper.make_node("Transpose", ["w_branch"], ["t_branch"], perm=[1, 0]),
            helper.make_node("Transpose", ["w_alone"], ["t_alone"], perm=[1, 0]),
            helper.make_node("Add", ["w_shared", "x"], ["y0"]),
            helper.make_node("If", ["c"], ["y1"], then_branch=branch, else_branch=branch),
            helper.make_node("Concat", ["t_shared", "t_branch", "t_alone"], ["y2"], axis=0),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
            for name, shape in (("y0", [2, 3]), ("y1", [2, 3]), ("y2", [9, 2]))
        ],
        [shared, branch_only, alone],
    )
    model = helper.make_model(graph)
    assert fold_constants(model, frozenset({"Transpose"})) == 3
    names = [init.name for init in model.graph.initializer]
    assert names == ["w_shared", "w_branch", "t_shared", "t_branch", "t_alone"]
    onnx.checker.check_model(model)
