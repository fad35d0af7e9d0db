"""Property tests: pruning any random CNN at any ratio gives a model equal to the masked reference.

The networks come from tests/random_cnn.py (residual sums of several branches, concats with offsets
and repeats, depthwise and grouped convs, squeeze-and-excitation, channel splits, Flatten/Gemm/MatMul
heads).  graphprune verifies its own result; these tests check it again independently: a masked
reference built from the removal mask, run next to the pruned model in onnxruntime at another batch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from random_cnn import Conv, Head, NetSpec, build_model, net_specs

from graphprune.api import prune
from graphprune.errors import PlanError
from graphprune.planning import PlanOptions
from graphprune.planning.plan import PruningPlan
from graphprune.surgery.apply import masked_reference

CRITERIA = ("l1", "l2", "random", "bn")
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def run(model: onnx.ModelProto, x: np.ndarray, extra: list[str]) -> dict[str, np.ndarray]:
    """Every graph output plus the `extra` intermediate tensors, on input `x`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in extra
    )
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [out.name for out in copy.graph.output]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def kept_channels(values: np.ndarray, view: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The positions of a reference tensor that survive pruning (view: the atom of each position)."""
    mask = keep[view]
    for axis in range(view.ndim):
        if view.shape[axis] > 1:
            others = tuple(a for a in range(view.ndim) if a != axis)
            values = np.compress(mask.any(axis=others), values, axis=axis)
    return values


def output_dims(model: onnx.ModelProto) -> list[list[int | str]]:
    return [
        [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] for out in model.graph.output
    ]


def has_bn(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "BatchNormalization" for node in model.graph.node)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def sample_input(spec: NetSpec, batch: int = 3) -> np.ndarray:
    rng = np.random.default_rng(spec.seed + 1)
    return rng.standard_normal((batch, spec.channels, spec.height, spec.width)).astype(np.float32)


@PROPERTY
@given(
    spec=net_specs(),
    ratio=st.floats(0.05, 0.8),
    criterion=st.sampled_from(CRITERIA),
    global_ranking=st.booleans(),
)
def test_pruned_model_equals_masked_reference(
    spec: NetSpec, ratio: float, criterion: str, global_ranking: bool
) -> None:
    """Verified, checker-clean, same outputs, no more MACs, and equal to our own masked reference on
    the outputs and every shared channel-carrying tensor (kept channels only)."""
    model = build_model(spec)
    options = PlanOptions(ratio=ratio, global_ranking=global_ranking)
    if criterion == "bn" and not has_bn(model):
        with pytest.raises(PlanError, match="BatchNormalization"):
            prune(model, options, criterion=criterion)
        return
    result = prune(model, options, criterion=criterion, seed=spec.seed)
    event("channels removed" if result.removed.any() else "nothing removed")

    assert result.verification is not None and result.verification.ok
    assert output_dims(result.model) == output_dims(model)
    inferred = onnx.shape_inference.infer_shapes(result.model, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    assert result.after.macs <= result.before.macs
    if result.removed.any():
        assert result.after.params < result.before.params

    outputs = {out.name for out in model.graph.output}
    shared = [
        name
        for node in result.model.graph.node
        for name in node.output
        if name in result.dep.views and name not in outputs
    ]
    x = sample_input(spec)
    reference = run(masked_reference(result.dep, result.removed), x, shared)
    pruned = run(result.model, x, shared)
    assert reference.keys() == pruned.keys()
    for name, expected in reference.items():
        if name not in outputs:
            expected = kept_channels(expected, result.dep.views[name], ~result.removed)
        actual = pruned[name]
        assert actual.shape == expected.shape, name
        scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@settings(PROPERTY, max_examples=60)
@given(
    spec=net_specs(),
    ratio=st.floats(0.05, 0.8),
    criterion=st.sampled_from(CRITERIA[:3]),
    global_ranking=st.booleans(),
)
def test_plan_round_trips_through_json(
    spec: NetSpec, ratio: float, criterion: str, global_ranking: bool
) -> None:
    """Saving a plan as JSON and replaying it gives the same removal and the same weights."""
    model = build_model(spec)
    options = PlanOptions(ratio=ratio, global_ranking=global_ranking)
    first = prune(model, options, criterion=criterion, seed=spec.seed, verify=False)
    with tempfile.TemporaryDirectory() as folder:
        path = first.plan.save(Path(folder) / "plan.json")
        loaded = PruningPlan.load(path)
    assert loaded.remove == first.plan.remove
    assert (loaded.criterion, loaded.settings) == (criterion, first.plan.settings)
    replayed = prune(model, plan=loaded)
    assert np.array_equal(replayed.removed, first.removed)
    expected, actual = initializers(first.model), initializers(replayed.model)
    assert expected.keys() == actual.keys()
    for name, values in expected.items():
        assert np.array_equal(actual[name], values), name
    assert [n.op_type for n in replayed.model.graph.node] == [n.op_type for n in first.model.graph.node]


def test_macs_target_is_an_upper_bound() -> None:
    model = build_model(NetSpec(2, 6, 6, (Conv(4),), Head()))
    result = prune(model, PlanOptions(target_macs=0.5))
    assert result.after.macs <= 0.5 * result.before.macs
