"""Verification compares inner tensors, not only outputs: a pruned model whose outputs match the masked
reference but whose features do not must be refused, naming the tensor that differs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import Net, feed, run
from onnx import numpy_helper

from graphprune.api import prune
from graphprune.errors import VerificationError
from graphprune.planning import PlanOptions
from graphprune.surgery.verify import verify_pruning


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(init for init in model.graph.initializer if init.name == name)


def test_wrong_inner_tensor_is_refused_even_when_outputs_match() -> None:
    # conv1 (8 channels) -> conv2: channel 0 of conv1 has large weights (so L1 keeps it) and no
    # influence on the output (conv2 reads it with zero weights), so corrupting it leaves outputs equal.
    net = Net(channels=3)
    hidden = net.conv(net.x, 8)
    out = net.conv(hidden, 4)
    model = net.build(out)
    weight = _initializer(model, "conv1.w")
    strong = numpy_helper.to_array(weight).copy()
    strong[0] *= 10
    weight.CopyFrom(numpy_helper.from_array(strong, "conv1.w"))
    consumer = _initializer(model, "conv2.w")
    blind = numpy_helper.to_array(consumer).copy()
    blind[:, 0] = 0
    consumer.CopyFrom(numpy_helper.from_array(blind, "conv2.w"))

    result = prune(model, PlanOptions(ratio=0.5), criterion="l1")
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    pruned_weight = _initializer(broken, "conv1.w")
    assert not numpy_helper.to_array(_initializer(broken, "conv2.w"))[:, 0].any()  # channel 0 kept first
    corrupted = numpy_helper.to_array(pruned_weight).copy()
    corrupted[0] = -corrupted[0]
    pruned_weight.CopyFrom(numpy_helper.from_array(corrupted, "conv1.w"))

    inputs = feed(broken, 2)
    np.testing.assert_array_equal(run(broken, inputs)[0], run(result.model, inputs)[0])
    with pytest.raises(VerificationError, match=r"at tensor conv1 "):
        verify_pruning(result.dep, result.removed, broken)
