"""Every op type in the registry (graphprune.ops.OPS) goes through a small producer -> op -> consumer model
that is pruned and verified against the masked reference, or is named in COVERED_BY with the test that
exercises it elsewhere.  A new op without either fails here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from helpers import prune_checked
from onnx import TensorProto, helper, numpy_helper

from graphprune.ops import OPS

C, H = 8, 6  # channels of the producer conv, spatial size
OPSET = 20

# Op types exercised by other tests (or with no data path), and where.
COVERED_BY = {
    "Shape": "tests/test_rules.py (shape arithmetic feeding Reshape / chunk bounds)",
    "Size": "reads a size, not channel data: its rule only stops channels (tests/test_rules.py)",
    "Constant": "folded into an initializer by model_io.clean (tests/test_export.py, tests/test_rules.py)",
    "GroupNormalization": "no channel rule: it blocks (tests/test_regressions.py group_norm)",
    "Upsample": "deprecated since opset 10; Resize shares its rule (tested here)",
    "Swish": "an opset-24 op onnxruntime does not run yet; its rule is the unary passthrough tested here",
    "Split": "tests/test_rules.py (split / chunk on the channel axis)",
}

Node = helper.make_node
Maker = Callable[[str, str, list[onnx.TensorProto]], list[onnx.NodeProto]]
rng = np.random.default_rng(0)


def const(name: str, values: np.ndarray, inits: list[onnx.TensorProto]) -> str:
    inits.append(numpy_helper.from_array(np.asarray(values), name))
    return name


def per_channel(name: str, inits: list[onnx.TensorProto], low: float = 0.5, high: float = 1.5) -> str:
    return const(name, rng.uniform(low, high, (1, C, 1, 1)).astype(np.float32), inits)


def unary(op_type: str, **attrs: object) -> Maker:
    return lambda x, y, inits: [Node(op_type, [x], [y], **attrs)]


def positive_unary(op_type: str) -> Maker:
    """Log, Sqrt, Reciprocal: fed sigmoid(x) + 0.5, so no NaN can hide a mismatch."""

    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        half = const("half", np.float32(0.5), inits)
        return [
            Node("Sigmoid", [x], ["sig"]),
            Node("Add", ["sig", half], ["pos"]),
            Node(op_type, ["pos"], [y]),
        ]

    return make


def binary(op_type: str) -> Maker:
    return lambda x, y, inits: [Node(op_type, [x, per_channel("operand", inits)], [y])]


def to_float(op_type: str, make: Callable[[str, list[onnx.TensorProto]], list[onnx.NodeProto]]) -> Maker:
    """Boolean ops: their output is cast back to float for the consumer conv."""
    return lambda x, y, inits: [*make(x, inits), Node("Cast", ["bool_out"], [y], to=TensorProto.FLOAT)]


def compare(op_type: str) -> Maker:
    return to_float(
        op_type, lambda x, inits: [Node(op_type, [x, per_channel("operand", inits, -0.5, 0.5)], ["bool_out"])]
    )


def logical(op_type: str) -> Maker:
    def make(x: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        zero, one = const("zero", np.float32(0), inits), const("one", np.float32(1), inits)
        return [
            Node("Greater", [x, zero], ["above"]),
            Node("Less", [x, one], ["below"]),
            Node(op_type, ["above", "below"], ["bool_out"]),
        ]

    return to_float(op_type, make)


def is_special(op_type: str) -> Maker:
    return to_float(op_type, lambda x, inits: [Node(op_type, [x], ["bool_out"])])


def negate(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    zero = const("zero", np.float32(0), inits)
    return [
        Node("Greater", [x, zero], ["above"]),
        Node("Not", ["above"], ["bool_out"]),
        Node("Cast", ["bool_out"], [y], to=TensorProto.FLOAT),
    ]


def where(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    zero = const("zero", np.float32(0), inits)
    return [
        Node("Greater", [x, zero], ["cond"]),
        Node("Where", ["cond", x, per_channel("other", inits)], [y]),
    ]


def clip(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    return [Node("Clip", [x, const("lo", np.float32(0), inits), const("hi", np.float32(6), inits)], [y])]


def prelu(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    return [Node("PRelu", [x, const("slope", rng.uniform(0, 0.5, (C, 1, 1)).astype(np.float32), inits)], [y])]


def power(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    return [
        *positive_unary("Identity")(x, "base", inits),
        Node("Pow", ["base", per_channel("exp", inits)], [y]),
    ]


def norm(op_type: str) -> Maker:
    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        scale = const("scale", rng.uniform(0.5, 1.5, C).astype(np.float32), inits)
        bias = const("bias", rng.normal(size=C).astype(np.float32), inits)
        if op_type == "InstanceNormalization":
            return [Node(op_type, [x, scale, bias], [y])]
        mean = const("mean", rng.normal(size=C).astype(np.float32), inits)
        var = const("var", rng.uniform(0.5, 1.5, C).astype(np.float32), inits)
        return [Node(op_type, [x, scale, bias, mean, var], [y])]

    return make


def conv_transpose(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    weight = const("tw", rng.normal(size=(C, 6, 2, 2)).astype(np.float32), inits)
    return [Node("ConvTranspose", [x, weight], [y], kernel_shape=[2, 2])]


def linear(op_type: str) -> Maker:
    """GlobalAveragePool -> Flatten -> the op (C -> 6 hidden units) -> Reshape back to [N, 6, 1, 1]."""

    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        weight = const("lw", rng.normal(size=(C, 6)).astype(np.float32), inits)
        shape = const("back", np.array([0, 6, 1, 1], dtype=np.int64), inits)
        return [
            Node("GlobalAveragePool", [x], ["pooled"]),
            Node("Flatten", ["pooled"], ["flat"]),
            Node(op_type, ["flat", weight], ["hidden"]),
            Node("Reshape", ["hidden", shape], [y]),
        ]

    return make


def reduce(op_type: str) -> Maker:
    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        axes = const("axes", np.array([2, 3], dtype=np.int64), inits)
        source = (
            positive_unary("Identity")(x, "pos_in", inits) if op_type in ("ReduceL1", "ReduceProd") else []
        )
        first = "pos_in" if source else x
        return [*source, Node(op_type, [first, axes], [y], keepdims=1)]

    return make


def with_ints(op_type: str, inputs: list[np.ndarray], **attrs: object) -> Maker:
    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        names = [const(f"arg{i}", v, inits) for i, v in enumerate(inputs)]
        return [Node(op_type, [x, *names], [y], **attrs)]

    return make


def squeeze_pair(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    axes = const("axes", np.array([4], dtype=np.int64), inits)
    return [Node("Unsqueeze", [x, axes], ["u"]), Node("Squeeze", ["u", axes], [y])]


def reshape_pair(op_type: str) -> Maker:
    """Flatten or Reshape to [N, C * H * H] and back (channels own blocks of features in between)."""

    def make(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
        back = const("back", np.array([0, C, H, H], dtype=np.int64), inits)
        if op_type == "Flatten":
            first = Node("Flatten", [x], ["flat"])
        else:
            first = Node(
                "Reshape", [x, const("flat_shape", np.array([0, -1], dtype=np.int64), inits)], ["flat"]
            )
        return [first, Node("Reshape", ["flat", back], [y])]

    return make


def concat(x: str, y: str, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    return [Node("Relu", [x], ["r"]), Node("Concat", [x, "r"], [y], axis=1)]


UNARY_PLAIN = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign Mish Erf Abs "
    "Neg Exp Identity Dropout Floor Ceil Round Sign ThresholdedRelu Sin Cos"
).split()
MAKERS: dict[str, Maker] = {
    **{op: unary(op) for op in UNARY_PLAIN},
    **{op: positive_unary(op) for op in ("Log", "Sqrt", "Reciprocal")},
    "Cast": unary("Cast", to=TensorProto.FLOAT),
    **{op: binary(op) for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean")},
    **{op: compare(op) for op in ("Equal", "Greater", "Less")},
    **{op: logical(op) for op in ("And", "Or")},
    **{op: is_special(op) for op in ("IsNaN", "IsInf")},
    "Not": negate,
    "Where": where,
    "Clip": clip,
    "PRelu": prelu,
    "Pow": power,
    **{op: unary(op, kernel_shape=[2, 2]) for op in ("MaxPool", "AveragePool", "LpPool")},
    **{op: unary(op) for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")},
    **{op: norm(op) for op in ("BatchNormalization", "InstanceNormalization")},
    "Conv": with_ints("Conv", [rng.normal(size=(6, C, 3, 3)).astype(np.float32)], pads=[1, 1, 1, 1]),
    "ConvTranspose": conv_transpose,
    "Gemm": linear("Gemm"),
    "MatMul": linear("MatMul"),
    **{
        op: reduce(op)
        for op in (
            "ReduceMean ReduceMax ReduceMin ReduceSum ReduceL1 ReduceL2 ReduceLogSumExp ReduceProd "
            "ReduceSumSquare"
        ).split()
    },
    **{op: unary(op, axis=-1) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    "Pad": with_ints("Pad", [np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64)]),
    "Resize": lambda x, y, inits: [
        Node("Resize", [x, "", const("scales", np.array([1, 1, 2, 2], dtype=np.float32), inits)], [y])
    ],
    "Concat": concat,
    "Slice": with_ints(
        "Slice", [np.array([1], dtype=np.int64), np.array([7], dtype=np.int64), np.array([1], dtype=np.int64)]
    ),
    "Gather": with_ints("Gather", [np.array([0, 2, 1, 3, 5, 4, 7, 6], dtype=np.int64)], axis=1),
    "Transpose": unary("Transpose", perm=[0, 1, 3, 2]),
    "Reshape": reshape_pair("Reshape"),
    "Flatten": reshape_pair("Flatten"),
    "Squeeze": squeeze_pair,
    "Unsqueeze": squeeze_pair,
}


def sandwich(op_type: str) -> onnx.ModelProto:
    """x -> Conv (C channels, the producer being pruned) -> op -> Conv 1x1 (the consumer) -> y."""
    inits: list[onnx.TensorProto] = []
    producer = const("pw", rng.normal(size=(C, 3, 3, 3)).astype(np.float32), inits)
    nodes = [Node("Conv", ["x", producer], ["a"], pads=[1, 1, 1, 1])]
    nodes += MAKERS[op_type]("a", "b", inits)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, H])
    probe = helper.make_model(
        helper.make_graph(
            nodes, "probe", [x], [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], inits
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    width = onnx.shape_inference.infer_shapes(probe).graph.output[0].type.tensor_type.shape.dim[1].dim_value
    consumer = const("cw", rng.normal(size=(4, width, 1, 1)).astype(np.float32), inits)
    nodes.append(Node("Conv", ["b", consumer], ["y"]))
    graph = helper.make_graph(
        nodes, op_type, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    for index, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{index}"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.graph.output[0].CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_every_registered_op_is_exercised_or_covered() -> None:
    untested = set(OPS) - set(MAKERS) - set(COVERED_BY)
    assert not untested, f"op types with neither a sandwich here nor a COVERED_BY entry: {sorted(untested)}"
    assert not set(COVERED_BY) & set(MAKERS)


@pytest.mark.parametrize("op_type", sorted(MAKERS))
def test_op_between_producer_and_consumer_prunes_exactly(op_type: str) -> None:
    """The producer conv loses half its channels through the op: prune_checked asserts the result is
    verified against the masked reference, equal to it at another batch size, and smaller."""
    prune_checked(sandwich(op_type), 0.5)
