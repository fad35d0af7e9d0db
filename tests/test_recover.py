"""Recovery without training (graphprune.surgery.recover): closed-form least squares, exact BN statistics,
streaming, bias correction, grouped convs, the ordering none < bn < lsq, and the API / CLI around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import Net
from onnx import helper, numpy_helper
from test_blend import fitted_model

from graphprune import PruningPlan, recover
from graphprune.api import prune, verify_plan
from graphprune.cli.demo import REFERENCE
from graphprune.data import load_dataset
from graphprune.errors import CalibrationError, VerificationError
from graphprune.planning import PlanOptions
from graphprune.runtime.session import make_session
from graphprune.surgery import recover as recover_module
from graphprune.surgery.apply import axis_keep
from graphprune.surgery.recover import (
    RecoveryConfig,
    agreement,
    conv_geometry,
    patches,
    recalibrate_batchnorm,
    recover_model,
)


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def tensors(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    session = make_session(model, extra_outputs=names)
    return [v.astype(np.float64) for v in session.run(names, {session.get_inputs()[0].name: images})]


def images(count: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


# least squares ----------------------------------------------------------------------------------------
def linear_model() -> onnx.ModelProto:
    """x -> Flatten -> gemm2 (8 hidden units) -> gemm3 (5 outputs): pruning hidden units leaves gemm3
    a linear regression problem with a closed-form answer."""
    net = Net(channels=3, size=2, seed=0)
    hidden = net.gemm(net.op("Flatten", [net.x]), 8)
    return net.build(net.gemm(hidden, 5))


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_lsq_on_a_gemm_is_the_closed_form_ridge_solution(ridge: float) -> None:
    model = linear_model()
    plan = PruningPlan(remove={"gemm2": [0, 3, 6]})
    pruned = prune(model, plan=plan, recover="none")
    x = images(64, (3, 2, 2))
    config = RecoveryConfig("lsq", ridge=ridge, batch_size=16)
    fitted, report = recover_model(pruned.dep, pruned.removed, pruned.model, x, config)
    assert report.reconstructed == ["gemm3"] and not report.skipped
    hidden, y = tensors(model, ["gemm2", "gemm3"], x)
    a = np.c_[hidden[:, [1, 2, 4, 5, 7]], np.ones(len(x))]
    before = inits(pruned.model)
    prior = np.vstack([before["gemm3.w"].T, before["gemm3.b"]])
    lam = ridge * np.mean(np.diag(a[:, :5].T @ a[:, :5]))
    penalty = np.diag([lam] * 5 + [0.0])
    theta = np.linalg.solve(a.T @ a + penalty, a.T @ y + penalty @ prior)
    if ridge == 0.0:
        np.testing.assert_allclose(theta, np.linalg.lstsq(a, y, rcond=None)[0], rtol=1e-6, atol=1e-8)
    after = inits(fitted)
    np.testing.assert_allclose(after["gemm3.w"], theta[:5].T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(after["gemm3.b"], theta[5], rtol=1e-3, atol=1e-4)


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """conv-BN-Relu, conv-BN-Relu (stride 2), a bias-free conv, GAP, Gemm."""
    net = Net(channels=1, size=12, seed=seed)
    a = net.stem(8)
    b = net.op("Relu", [net.bn(net.conv(a, 8, stride=2))])
    c = net.op("Relu", [net.conv(b, 8, bias=False)])
    return net.build(net.gemm(net.op("Flatten", [net.op("GlobalAveragePool", [c])]), 4))


def test_lsq_streamed_over_batches_equals_one_batch() -> None:
    pruned = prune(conv_net(), PlanOptions(ratio=0.5), recover="none")
    x = images(48, (1, 12, 12))
    streamed, report = recover_model(
        pruned.dep, pruned.removed, pruned.model, x, RecoveryConfig("lsq", batch_size=7)
    )
    whole, _ = recover_model(
        pruned.dep, pruned.removed, pruned.model, x, RecoveryConfig("lsq", batch_size=48)
    )
    assert report.reconstructed and report.batchnorms
    for name, value in inits(whole).items():
        np.testing.assert_allclose(inits(streamed)[name], value, rtol=1e-3, atol=1e-3, err_msg=name)


def test_levels_starting_from_the_run_before_equals_starting_from_the_image(monkeypatch) -> None:
    net = Net(channels=1, size=12, seed=2)
    a = net.stem(8)
    b = net.bn(net.conv(net.op("Relu", [net.bn(net.conv(a, 8))]), 8))
    c = net.op("Relu", [net.op("Add", [a, b])])
    model = net.build(net.gemm(net.op("Flatten", [net.op("GlobalAveragePool", [net.conv(c, 8)])]), 4))
    pruned = prune(model, PlanOptions(ratio=0.5), recover="none")
    x = images(24, (1, 12, 12))
    config = RecoveryConfig("lsq", batch_size=8)
    carried, report = recover_model(pruned.dep, pruned.removed, pruned.model, x, config)
    assert len(report.reconstructed) >= 3
    monkeypatch.setattr(recover_module, "_carried", lambda model, levels: [[] for _ in levels])
    recomputed, _ = recover_model(pruned.dep, pruned.removed, pruned.model, x, config)
    for name, value in inits(recomputed).items():  # a cut graph's kernels round differently
        np.testing.assert_allclose(inits(carried)[name], value, rtol=1e-3, atol=1e-4, err_msg=name)


def test_patches_times_weights_is_the_conv() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 3, 3, 2)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2], name="conv"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 9, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    x = images(2, (3, 9, 8))
    (y,) = make_session(helper.make_model(graph)).run(None, {"x": x})
    rows = patches(x, conv_geometry(node, w, (9, 8))) @ w.reshape(5, -1).T + b
    np.testing.assert_allclose(rows, np.moveaxis(y, 1, -1).reshape(-1, 5), rtol=1e-4, atol=1e-5)


def test_patches_at_positions_are_those_rows_of_every_image() -> None:
    x = images(3, (2, 7, 6))
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 1, 1, 1], name="conv")
    shape = conv_geometry(node, np.zeros((4, 2, 3, 3), np.float32), (7, 6))
    every = patches(x, shape)
    positions = np.array([0, 5, 17, 23])
    want = every.reshape(3, -1, every.shape[1])[:, positions].reshape(-1, every.shape[1])
    np.testing.assert_array_equal(patches(x, shape, positions), want)


def test_lsq_position_sample_is_seeded_and_a_cap_above_the_positions_samples_nothing() -> None:
    pruned = prune(conv_net(), PlanOptions(ratio=0.5), recover="none")
    x = images(24, (1, 12, 12))

    def fit(**options: int) -> dict[str, np.ndarray]:
        config = RecoveryConfig("lsq", batch_size=8, **options)
        return inits(recover_model(pruned.dep, pruned.removed, pruned.model, x, config)[0])

    sampled, again, other = fit(positions=20), fit(positions=20), fit(positions=20, seed=1)
    assert all(np.array_equal(sampled[name], value) for name, value in again.items())
    assert not all(np.array_equal(sampled[name], value) for name, value in other.items())
    every, capped = fit(positions=10**6), fit(positions=12 * 12)  # 144: the most a conv here has
    assert all(np.array_equal(every[name], value) for name, value in capped.items())
    assert not all(np.array_equal(every[name], value) for name, value in sampled.items())


def test_grouped_convs_are_fitted_per_group_and_depthwise_ones_named() -> None:
    net = Net(channels=1, size=10, seed=3)
    grouped = net.conv(net.stem(8), 8, group=2)  # conv4
    depthwise = net.conv(net.op("Relu", [grouped]), 8, group=8)  # conv6
    model = net.build(net.conv(net.op("Relu", [depthwise]), 4))  # conv8
    pruned = prune(model, PlanOptions(ratio=0.5), recover="none")
    x = images(64, (1, 10, 10))
    fitted, report = recover_model(
        pruned.dep, pruned.removed, pruned.model, x, RecoveryConfig("lsq", ridge=0.0)
    )
    assert "conv4" in report.reconstructed and "depthwise" in report.skipped["conv6"]
    assert inits(fitted)["conv4.w"].shape == inits(pruned.model)["conv4.w"].shape
    keep = axis_keep(pruned.dep.views["conv4"], ~pruned.removed, 1, "conv4")
    (want,) = tensors(model, ["conv4"], x)
    (none,) = tensors(pruned.model, ["conv4"], x)
    (got,) = tensors(fitted, ["conv4"], x)
    error = np.linalg.norm(got - want[:, keep])
    assert error < 0.8 * np.linalg.norm(none - want[:, keep])


# BN recalibration and bias correction -------------------------------------------------------------------
def test_recalibrated_bn_statistics_are_those_of_the_activations_streamed_or_not() -> None:
    net = Net(channels=1, size=28, seed=1)
    conv1 = net.conv(net.x, 4)
    model = net.build(net.bn(net.conv(net.op("Relu", [net.bn(conv1)]), 4)))  # bn2, conv4, bn5
    x = load_dataset("synthetic:96").images
    streamed = recalibrate_batchnorm(model, x, batch_size=32)
    stats = inits(streamed)
    (a,) = tensors(model, [conv1], x)
    np.testing.assert_allclose(stats["bn2.mean"], a.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn2.var"], a.var(axis=(0, 2, 3)), rtol=1e-5)
    (b,) = tensors(streamed, ["conv4"], x)  # behind the recalibrated first BN
    np.testing.assert_allclose(stats["bn5.mean"], b.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn5.var"], b.var(axis=(0, 2, 3)), rtol=1e-5)
    assert not np.allclose(stats["bn5.mean"], inits(model)["bn5.mean"], atol=1e-2)
    for name, value in inits(recalibrate_batchnorm(model, x, batch_size=96)).items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_bias_correction_restores_the_mean_output_of_a_bn_folded_model() -> None:
    net = Net(channels=2, size=8, seed=2)
    a = net.op("Relu", [net.conv(net.x, 8)])  # conv1
    b = net.op("Relu", [net.conv(a, 8)])  # conv3: loses inputs and outputs
    model = net.build(net.conv(b, 6, bias=False))  # conv5: no bias to shift yet
    pruned = prune(model, PlanOptions(ratio=0.5), recover="none")
    x = images(40, (2, 8, 8))
    fixed, report = recover_model(
        pruned.dep, pruned.removed, pruned.model, x, RecoveryConfig("bn", batch_size=16)
    )
    assert report.bias_corrected == ["conv3", "conv5"] and not report.batchnorms
    assert next(n for n in fixed.graph.node if n.name == "conv5").input[2] == "conv5_recovered_bias"
    keep = axis_keep(pruned.dep.views["conv3"], ~pruned.removed, 1, "conv3")
    want3, want5 = tensors(model, ["conv3", "conv5"], x)
    before3, before5 = tensors(pruned.model, ["conv3", "conv5"], x)
    got3, got5 = tensors(fixed, ["conv3", "conv5"], x)
    for want, before, got in ((want3[:, keep], before3, got3), (want5, before5, got5)):
        target = want.mean(axis=(0, 2, 3))
        assert not np.allclose(before.mean(axis=(0, 2, 3)), target, atol=1e-2)
        np.testing.assert_allclose(got.mean(axis=(0, 2, 3)), target, rtol=1e-4, atol=1e-5)


# end to end -------------------------------------------------------------------------------------------
def test_lsq_beats_bn_beats_nothing_on_held_out_images() -> None:
    data = load_dataset("synthetic:512")
    model = fitted_model(data)
    results = {
        m: prune(model, PlanOptions(ratio=0.5), calib=data, calib_samples=256, recover=m)
        for m in ("bn", "lsq")
    }
    bn, lsq = results["bn"].recovery, results["lsq"].recovery
    assert bn.heldout_samples == lsq.heldout_samples == 256 and bn.fit_samples == 256
    assert lsq.rel_error < bn.rel_error < bn.rel_error_before
    assert lsq.agreement >= bn.agreement >= bn.agreement_before
    assert results["lsq"].plan.settings["recovery"]["rel_error"] == lsq.rel_error
    assert prune(model, PlanOptions(ratio=0.5), calib=data).recovery.method == "bn"  # the default


def test_recover_on_its_own_matches_prune_and_verify_refuses_recovered_models(tmp_path: Path) -> None:
    data = load_dataset("synthetic:384")
    model = fitted_model(data)
    plain = prune(model, PlanOptions(ratio=0.5), recover="none")
    assert plain.recovery is None and "recovery" not in plain.plan.settings
    alone = recover(model, plain.model, data, plan=plain.plan, method="lsq", calib_samples=128)
    inside = prune(model, PlanOptions(ratio=0.5), calib=data, calib_samples=128, recover="lsq")
    for name, value in inits(inside.model).items():
        np.testing.assert_array_equal(inits(alone.model)[name], value)
    assert verify_plan(model, plain.model, plain.plan).ok
    with pytest.raises(VerificationError, match="recovered"):
        verify_plan(model, inside.model, inside.plan)
    with pytest.raises(CalibrationError, match="--calib"):
        prune(model, PlanOptions(ratio=0.5), recover="lsq")


def test_cli_refuses_lsq_without_calibration_data(tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphprune.cli",
            "prune",
            str(REFERENCE),
            "-o",
            str(out),
            "--ratio",
            "0.5",
            "--recover",
            "lsq",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and not out.exists()
    assert (
        done.stderr.strip()
        == "graphprune: error: --recover lsq fits on calibration images: add --calib DATA."
    )


def test_a_model_with_a_fixed_batch_size_is_fed_batches_of_that_size() -> None:
    model = conv_net()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    pruned = prune(model, PlanOptions(ratio=0.5), recover="none")
    x = images(18, (1, 12, 12))  # 4 full batches; the 2 left over cannot fill one
    fitted, report = recover_model(pruned.dep, pruned.removed, pruned.model, x, RecoveryConfig("lsq"))
    assert report.reconstructed and not report.skipped
    assert agreement(model, fitted, x).rel_error < agreement(model, pruned.model, x).rel_error


def test_the_cli_names_layers_left_as_is_once_per_reason(capsys) -> None:  # noqa: ANN001
    """MobileNetV3 has a dozen depthwise convs lsq cannot re-fit: one line for them, two named."""
    from graphprune.cli.model import _print_recovery
    from graphprune.surgery.recover import RecoveryReport

    skipped = {f"dw{i}": "not reconstructed: depthwise convolution" for i in range(5)}
    report = RecoveryReport("lsq", 13, 1.0, skipped={**skipped, "bn": "BN parameters are not initialisers"})
    report.heldout_samples, report.rel_error, report.rel_error_before = 3, 0.1, 0.9
    _print_recovery(report)
    printed = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert printed.count("left as is") == 2
    assert "left as is (5): not reconstructed: depthwise convolution: dw0, dw1 and 3 more" in printed
    assert "left as is (1): BN parameters are not initialisers: bn" in printed


def test_a_cut_fed_one_output_of_a_node_it_runs_for_another_defines_it_once() -> None:
    """Split makes a and b; the cut that computes a + b with b fed keeps the Split for a, whose b
    output onnxruntime refused as a second definition of the fed input (ultralytics' C3k2 blocks split
    their input so: lsq recovery of YOLO11 failed)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    nodes = [
        helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    sizes = numpy_helper.from_array(np.array([2, 2], np.int64), "sizes")
    model = helper.make_model(helper.make_graph(nodes, "split", [x], [y], [sizes]))
    cut = recover_module._truncated(model, ["y"], {"b": np.dtype(np.float32)})
    fed = np.array([[10.0, 20.0]], np.float32)
    (out,) = make_session(cut).run(["y"], {"x": np.arange(4, dtype=np.float32)[None], "b": fed})
    np.testing.assert_array_equal(out, [[10.0, 21.0]])
