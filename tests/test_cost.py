"""MAC and parameter counts on hand-built graphs (numbers worked out by hand) and on ResNet-18."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphPruneError
from graphprune.runtime.cost import count_cost
from graphprune.runtime.session import input_feed, make_session


def _init(name: str, *shape: int, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, ...]],
    output: str,
    initializers: list[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # also types the output
    onnx.checker.check_model(model)
    return model


def _ort_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the graph inputs and of every node output, found by running the model at batch 1."""
    feed = input_feed(model, 1, 0)
    names = [out for node in model.graph.node for out in node.output if out]
    session = make_session(model, extra_outputs=names)
    fetched = session.run(names, feed)
    return {name: array.shape for name, array in (*feed.items(), *zip(names, fetched, strict=True))}


def _cost(model: onnx.ModelProto):
    return count_cost(model, _ort_shapes(model))


def test_conv_with_bias() -> None:
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = _model([node], {"x": (1, 3, 8, 8)}, "y", [_init("w", 8, 3, 3, 3), _init("b", 8)])
    report = _cost(model)
    # 8x8x8 = 512 outputs, each 3 * 3x3 = 27 MACs, plus one bias add each
    assert report.macs == 512 * 27 + 512 == 14336
    assert report.params == 8 * 3 * 9 + 8 == 224
    assert report.per_node == {"conv": report.per_node["conv"]}
    assert report.per_node["conv"].op == "Conv"


def test_depthwise_conv() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", pads=[1, 1, 1, 1], group=8)
    report = _cost(_model([node], {"x": (1, 8, 8, 8)}, "y", [_init("w", 8, 1, 3, 3)]))
    assert report.macs == 512 * 1 * 9 == 4608
    assert report.params == 72


def test_grouped_conv() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="g4", pads=[1, 1, 1, 1], group=4)
    report = _cost(_model([node], {"x": (1, 8, 8, 8)}, "y", [_init("w", 16, 2, 3, 3)]))
    # 16x8x8 = 1024 outputs, each sees 8 / 4 = 2 input channels x 9 taps
    assert report.macs == 1024 * 2 * 9 == 18432
    assert report.params == 288


def test_conv_transpose_counts_input_positions() -> None:
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", strides=[2, 2])
    report = _cost(_model([node], {"x": (1, 4, 4, 4)}, "y", [_init("w", 4, 2, 3, 3), _init("b", 2)]))
    # each of the 64 inputs scatters into 2 channels x 9 taps; output is 2x9x9 = 162 (bias adds)
    assert report.macs == 64 * 18 + 162 == 1314
    assert report.params == 74


def test_gemm_with_bias_and_trans_b() -> None:
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1)
    report = _cost(_model([node], {"x": (1, 512)}, "y", [_init("w", 10, 512), _init("c", 10)]))
    assert report.macs == 10 * 512 + 10 == 5130
    assert report.params == 5130


def test_gemm_trans_a_without_bias() -> None:
    node = helper.make_node("Gemm", ["a", "w"], ["y"], name="fc", transA=1)
    report = _cost(_model([node], {"a": (6, 3)}, "y", [_init("w", 6, 4)]))
    assert report.macs == 3 * 4 * 6 == 72
    assert report.params == 24


def test_matmul_with_weight() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    report = _cost(_model([node], {"x": (1, 4, 6, 8)}, "y", [_init("w", 8, 5)]))
    assert report.macs == 4 * 6 * 5 * 8 == 960
    assert report.params == 40


def test_matmul_broadcasts_batch_dims() -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="bmm")
    report = _cost(_model([node], {"a": (2, 1, 3, 4), "b": (5, 4, 6)}, "y"))
    # output [2, 5, 3, 6] = 180 elements, K = 4
    assert report.macs == 180 * 4 == 720
    assert report.params == 0


def test_norm_activation_pool_and_free_ops() -> None:
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "x"], ["sum"], name="add"),
        helper.make_node("Sigmoid", ["sum"], ["sig"], name="sig"),
        helper.make_node("MaxPool", ["sig"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = [_init(name, 8) for name in "sbmv"]
    report = _cost(_model(nodes, {"x": (1, 8, 8, 8)}, "y", inits))
    macs = {key: cost.macs for key, cost in report.per_node.items()}
    assert macs == {"bn": 2 * 512, "relu": 512, "add": 0, "sig": 0, "pool": 512}
    assert report.macs == 2048
    assert report.params == 16  # scale and bias; running mean and var are buffers


def test_shared_initializer_counts_once_and_identity_alias_counts_again() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["w"], ["w_alias"], name="alias"),
        helper.make_node("Conv", ["c2", "w_alias"], ["y"], name="c3", pads=[1, 1, 1, 1]),
    ]
    report = _cost(_model(nodes, {"x": (1, 4, 5, 5)}, "y", [_init("w", 4, 4, 3, 3)]))
    assert report.params == 2 * 144
    assert [report.per_node[key].params for key in ("c1", "c2", "alias", "c3")] == [144, 0, 0, 144]
    assert report.macs == 3 * 100 * 36
    assert sum(cost.macs for cost in report.per_node.values()) == report.macs


def test_integer_initializers_are_not_params_and_unnamed_nodes_get_keys() -> None:
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape"), _init("w", 3, 32)]
    report = _cost(_model(nodes, {"x": (1, 2, 4, 4)}, "y", inits))
    assert report.params == 96
    assert list(report.per_node) == ["Reshape_0", "Gemm_1"]
    assert report.macs == 96


def test_missing_shape_names_the_tensor() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _model([node], {"x": (1, 3, 8, 8)}, "y", [_init("w", 8, 3, 3, 3)])
    with pytest.raises(GraphPruneError, match="'y'.*'conv'"):
        count_cost(model, {"x": (1, 3, 8, 8)})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its retirement
def test_resnet18_matches_torch_pruning_convention(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    module = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.onnx"
    # Legacy exporter with BN kept: it merges equal initialisers behind Identity nodes, which the
    # parameter count must see through.
    torch.onnx.export(
        module,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    model = onnx.load(str(path))
    report = _cost(model)
    by_op: dict[str, int] = {}
    for cost in report.per_node.values():
        by_op[cost.op] = by_op.get(cost.op, 0) + cost.macs
    # Torch-Pruning's count_ops_and_params (ptflops hooks) on the same module gives these exactly.
    assert by_op["Conv"] == 1_813_561_344
    assert by_op["BatchNormalization"] == 4_967_424
    assert by_op["Relu"] == 2_308_096
    assert by_op["MaxPool"] == 802_816
    assert by_op["GlobalAveragePool"] == 25_088
    assert by_op["Gemm"] == 512 * 1000 + 1000
    assert report.macs == 1_822_177_768
    assert report.params == sum(p.numel() for p in module.parameters()) == 11_689_512
