"""Shared test helpers: a tiny ONNX graph builder and a prune-and-check routine.

The builder makes each op-rule test a few lines: named nodes (so `dep.blocked_nodes` and initializer
shapes can be asserted by name), seeded random weights and non-trivial BatchNorm statistics, and a
dynamic batch dimension.  `prune_checked` runs `graphprune.api.prune` with verification and asserts
what every exact pruning must satisfy.  Nothing here imports torch except `export_torch` (lazily).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphprune.analysis.graph import DependencyGraph
from graphprune.api import PruneResult, analyze_model, prune
from graphprune.planning import PlanOptions
from graphprune.surgery.apply import masked_reference

BATCH = "N"


class Net:
    """Builds a small NCHW graph node by node; the k-th node, of type Op, is named and outputs `op<k>`
    (lower case), its weight is `op<k>.w` and its bias `op<k>.b`; unnamed constants are `k<n>`."""

    def __init__(
        self, channels: int = 4, size: int = 8, *, opset: int = 17, seed: int = 0, domains: tuple = ()
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.domains = domains
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.x = "x"
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, channels, size, size])
        self._count = 0
        self._consts = 0

    # primitives --------------------------------------------------------------------------------
    def _name(self, op_type: str) -> str:
        self._count += 1
        return f"{op_type.lower()}{self._count}"

    def const(self, values: Any, name: str | None = None, dtype: type = np.float32) -> str:
        """An initializer holding `values`."""
        if name is None:
            self._consts += 1
            name = f"k{self._consts}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def random(self, *shape: int, name: str | None = None, low: float = -1.0, high: float = 1.0) -> str:
        return self.const(self.rng.uniform(low, high, size=shape), name)

    def op(
        self,
        op_type: str,
        inputs: list[str],
        outputs: int = 1,
        domain: str = "",
        name: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Append a node; returns its output name (or the list of names when `outputs` > 1)."""
        name = name or self._name(op_type)
        names = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def shape(self, tensor: str) -> tuple[int, ...]:
        """Shape of a tensor with the batch set to 1 (ONNX shape inference on the graph so far)."""
        if tensor == self.x:
            return (1, *(d.dim_value for d in self.input.type.tensor_type.shape.dim[1:]))
        fixed = onnx.shape_inference.infer_shapes(self.model(), data_prop=True)
        for value in fixed.graph.value_info:
            dims = value.type.tensor_type.shape.dim
            if value.name == tensor and all(d.HasField("dim_value") or d.dim_param == BATCH for d in dims):
                return (1, *(d.dim_value for d in dims[1:]))
        model = self.model(tensor)  # shape inference does not know the op: run it
        return run(model, feed(model, 1))[0].shape

    def channels(self, tensor: str) -> int:
        return self.shape(tensor)[1]

    # layers ------------------------------------------------------------------------------------
    def conv(
        self, x: str, cout: int, k: int = 3, *, group: int = 1, bias: bool = True, stride: int = 1
    ) -> str:
        name = self._name("conv")
        cin = self.channels(x)
        scale = 1.0 / np.sqrt(cin // group * k * k)
        w = self.const(self.rng.normal(0, scale, (cout, cin // group, k, k)), f"{name}.w")
        inputs = [x, w]
        if bias:
            inputs.append(self.random(cout, name=f"{name}.b", low=-0.5, high=0.5))
        pads = [k // 2] * 4
        return self.op(
            "Conv", inputs, name=name, kernel_shape=[k, k], pads=pads, strides=[stride] * 2, group=group
        )

    def conv_transpose(self, x: str, cout: int, *, stride: int = 2) -> str:
        name = self._name("convtranspose")
        cin = self.channels(x)
        w = self.const(self.rng.normal(0, 0.3, (cin, cout, 2, 2)), f"{name}.w")
        b = self.random(cout, name=f"{name}.b")
        return self.op("ConvTranspose", [x, w, b], name=name, kernel_shape=[2, 2], strides=[stride] * 2)

    def bn(self, x: str) -> str:
        name = self._name("bn")
        c = self.channels(x)
        params = [
            self.random(c, name=f"{name}.gamma", low=0.5, high=1.5),
            self.random(c, name=f"{name}.beta"),
            self.random(c, name=f"{name}.mean"),
            self.random(c, name=f"{name}.var", low=0.5, high=2.0),
        ]
        return self.op("BatchNormalization", [x, *params], name=name, epsilon=1e-5)

    def instance_norm(self, x: str) -> str:
        name = self._name("inorm")
        c = self.channels(x)
        scale = self.random(c, name=f"{name}.gamma", low=0.5, high=1.5)
        beta = self.random(c, name=f"{name}.beta")
        return self.op("InstanceNormalization", [x, scale, beta], name=name)

    def gemm(self, x: str, units: int, *, trans_b: bool = True) -> str:
        name = self._name("gemm")
        features = self.shape(x)[1]
        shape = (units, features) if trans_b else (features, units)
        w = self.const(self.rng.normal(0, 1 / np.sqrt(features), shape), f"{name}.w")
        b = self.random(units, name=f"{name}.b")
        return self.op("Gemm", [x, w, b], name=name, transB=int(trans_b))

    def matmul(self, x: str, units: int) -> str:
        name = self._name("matmul")
        features = self.shape(x)[-1]
        w = self.const(self.rng.normal(0, 1 / np.sqrt(features), (features, units)), f"{name}.w")
        return self.op("MatMul", [x, w], name=name)

    def stem(self, channels: int = 8) -> str:
        """conv -> BN -> Relu: a prunable group of `channels` feeding the op under test."""
        return self.op("Relu", [self.bn(self.conv(self.x, channels))])

    def head(self, x: str, channels: int = 8, out: int = 6) -> str:
        """conv(channels) -> Relu -> conv(out): one more prunable group, then the (never narrowed) output."""
        return self.conv(self.op("Relu", [self.conv(x, channels)]), out)

    def model(self, *outputs: str, shapes: tuple = ()) -> onnx.ModelProto:
        shapes = shapes or (None,) * len(outputs)
        graph = helper.make_graph(
            self.nodes,
            "test",
            [self.input],
            [
                helper.make_tensor_value_info(o, TensorProto.FLOAT, s)
                for o, s in zip(outputs, shapes, strict=True)
            ],
            self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset), *(helper.make_opsetid(d, 1) for d in self.domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = min(model.ir_version, 10)
        return model

    def build(self, *outputs: str) -> onnx.ModelProto:
        """The finished model (outputs typed, batch symbolic), checked."""
        shapes = tuple((BATCH, *self.shape(o)[1:]) for o in outputs)
        model = self.model(*outputs, shapes=shapes)
        onnx.checker.check_model(model, full_check=True)
        return model


# checks ----------------------------------------------------------------------------------------
def grouped_block(
    channels: int = 16, groups: int = 4, residual: bool = False, widen: int = 1
) -> onnx.ModelProto:
    """conv1 8->channels (1x1), BN, Relu, conv4 channels->channels x widen in `groups` conv groups, BN,
    Relu, a 1x1 head to 6; with `residual`, conv4's input is added to its output, which ties the two
    sides of the grouped conv (RegNet's bottleneck without and with that tie)."""
    net = Net(channels=8, size=8)
    x = net.op("Relu", [net.bn(net.conv(net.x, channels, k=1))])
    y = net.op("Relu", [net.bn(net.conv(x, channels * widen, group=groups))])
    return net.build(net.conv(net.op("Add", [x, y]) if residual else y, 6, k=1))


def feed(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    result = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        result[value.name] = rng.standard_normal(dims).astype(np.float32)
    return result


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def init_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    """Dims of the named initializer (after surgery as before)."""
    for init in model.graph.initializer:
        if init.name == name:
            return tuple(init.dims)
    raise KeyError(name)


def node_attr(model: onnx.ModelProto, node: str, attr: str) -> object:
    found = next(n for n in model.graph.node if n.name == node)
    return next(onnx.helper.get_attribute_value(a) for a in found.attribute if a.name == attr)


def prunable_channels(dep: DependencyGraph) -> int:
    return sum(int(g.prunable.size) for g in dep.prunable_groups)


def blocked_ops(dep: DependencyGraph) -> set[str]:
    """Op types named by `dep.blocked_nodes` labels "node (Op)" (outputs excluded)."""
    return {label.rsplit("(", 1)[1].rstrip(")") for label in dep.blocked_nodes if "(" in label}


def prune_checked(
    model: onnx.ModelProto | str | os.PathLike[str],
    ratio: float | PlanOptions,
    *,
    shrinks: bool = True,
    criterion: str = "l1",
    batch: int = 3,
    **kwargs: Any,
) -> PruneResult:
    """Prune at `ratio` (or by the given options, with further keyword arguments of prune) with
    verification and assert: verified, checker-clean, same output shapes at a new batch size, equal to
    the masked reference at that batch, and (if `shrinks`) smaller."""
    options = ratio if isinstance(ratio, PlanOptions) else PlanOptions(ratio=ratio)
    result = prune(model, options, criterion=criterion, **kwargs)
    assert result.verification is not None and result.verification.ok
    onnx.checker.check_model(result.model)
    original = result.dep.model
    inputs = feed(original, batch, seed=7)
    expected = run(masked_reference(result.dep, result.removed), inputs)
    actual = run(result.model, inputs)
    for ref, got, before in zip(expected, actual, run(original, inputs), strict=True):
        assert got.shape == before.shape and got.shape[0] == batch
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    if shrinks:
        assert result.removed.any()
        assert param_count(result.model) < param_count(original)
        assert result.after.params < result.before.params
    else:
        assert not result.removed.any()
    return result


def structure(model: onnx.ModelProto) -> tuple[int, int]:
    """(number of prunable groups, number of prunable channels) of a model."""
    dep = analyze_model(model)
    return len(dep.prunable_groups), prunable_channels(dep)


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_torch(module: Any, shape: tuple[int, ...], path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Export with the legacy exporter the way users do for pruning (BN kept, eval, dynamic batch)."""
    import torch

    module.eval()
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return onnx.load(str(path))
