"""Blending Pruning Criteria: clustering by rank similarity, the seeded evolutionary search, BN
recalibration in ONNX, and the whole blend through prune() on a model with a fitted classifier head."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
from helpers import Net
from onnx import numpy_helper
from test_activations import hand_data, hand_model

from graphprune.api import analyze_model, prune
from graphprune.cli.criteria import register
from graphprune.criteria.normalize import spearman_matrix
from graphprune.data import ArrayDataset, load_dataset
from graphprune.errors import CalibrationError, DataError, PlanError
from graphprune.planning import PlanOptions
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.runtime.session import make_session
from graphprune.search.blend import (
    BlendConfig,
    PoolScores,
    SearchConfig,
    cluster_indices,
    cluster_layers,
    evolve,
)
from graphprune.surgery.recover import recalibrate_batchnorm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# clustering ---------------------------------------------------------------------------------------
def test_identical_criteria_merge_and_opposed_ones_separate() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(16), rng.random(16)
    similarity = spearman_matrix(np.vstack([a, 2 * a + 1, -a, b, a**3]))
    assert cluster_indices(similarity, 0.9) == [[0, 1, 4], [2], [3]]


def test_layer_clusters_keep_one_representative() -> None:
    dep = analyze_model(hand_model())
    group = dep.prunable_groups[0]
    pool = PoolScores(
        {
            "first": {0: np.array([1.0, 2.0, 3.0])},
            "same": {0: np.array([10.0, 20.0, 30.0])},
            "opposed": {0: np.array([3.0, 2.0, 1.0])},
            "flat": {0: np.array([5.0, 5.0, 5.0])},
        }
    )
    (layer,) = cluster_layers(pool, [group], 0.9)
    assert layer.clusters == [["first", "same"], ["opposed"], ["flat"]]
    assert layer.representatives == ["first", "opposed", "flat"]
    assert layer.cluster_of("same") == 0 and layer.cluster_of("missing") is None
    assert layer.similarity[0, 2] == pytest.approx(-1.0) and np.isnan(layer.similarity[0, 3])


# search ---------------------------------------------------------------------------------------------
def quadratic(target: np.ndarray, calls: list[int]):  # noqa: ANN201 - a fitness function for evolve
    def evaluate_many(genomes: list[np.ndarray]) -> list[float]:
        calls.append(len(genomes))
        return [-float(((g - target) ** 2).sum()) for g in genomes]

    return evaluate_many


def test_search_is_deterministic_for_a_seed_and_beats_single_candidates() -> None:
    target = np.array([0.2, 0.5, 0.3])
    config = SearchConfig(population=8, generations=6, seed=3)
    calls: list[int] = []
    first = evolve(3, quadratic(target, calls), config, progress=False)
    second = evolve(3, quadratic(target, []), config, progress=False)
    np.testing.assert_array_equal(first.best, second.best)
    assert [(g.best, g.mean) for g in first.history] == [(g.best, g.mean) for g in second.history]
    assert calls[0] == 8 and sum(calls) == len(first.evaluated)  # each genome evaluated once
    singles = [first.fitness_of(np.eye(3)[k]) for k in range(3)]
    assert first.fitness >= max(singles) and first.fitness > max(singles) + 0.1
    assert [g.best for g in first.history] == sorted(g.best for g in first.history)  # elitism
    other = evolve(
        3, quadratic(target, []), SearchConfig(population=8, generations=6, seed=4), progress=False
    )
    assert not np.array_equal(other.best, first.best)


def test_search_keeps_the_best_single_candidate_when_nothing_beats_it() -> None:
    def evaluate_many(genomes: list[np.ndarray]) -> list[float]:
        return [1.0 if g[1] == 1.0 else 0.5 for g in genomes]

    result = evolve(3, evaluate_many, SearchConfig(population=6, generations=3), progress=False)
    np.testing.assert_array_equal(result.best, [0.0, 1.0, 0.0])
    assert result.fitness == 1.0


def test_search_with_one_candidate_evaluates_once() -> None:
    calls: list[int] = []
    result = evolve(1, quadratic(np.ones(1), calls), SearchConfig(), progress=False)
    assert calls == [1] and result.best.tolist() == [1.0] and len(result.history) == 1


def test_search_options_are_checked() -> None:
    with pytest.raises(PlanError, match="elite"):
        evolve(2, quadratic(np.ones(2), []), SearchConfig(population=4, elite=4), progress=False)


# BN recalibration (tests/test_recover.py) and accuracy -------------------------------------------------------------------------
def test_models_without_bn_are_left_alone_and_accuracy_is_top1() -> None:
    model = hand_model()
    assert recalibrate_batchnorm(model, hand_data().images) is model
    data = hand_data()
    logits = make_session(model).run(None, {"x": data.images})[0]
    assert evaluate_onnx(model, data) == np.mean(logits.argmax(axis=1) == data.labels)


# the blend end to end --------------------------------------------------------------------------------
def fitted_model(data: ArrayDataset, seed: int = 0) -> onnx.ModelProto:
    """Random conv features (BN recalibrated on the data) and a ridge-regression Gemm head: ~70%
    accurate on the synthetic set, so removing channels changes the accuracy."""
    net = Net(channels=1, size=28, seed=seed)
    features = net.op("Relu", [net.bn(net.conv(net.stem(8), 16, stride=2))])
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [features])])
    model = recalibrate_batchnorm(net.build(net.gemm(flat, 10)), data.images)
    x = make_session(model, extra_outputs=[flat]).run([flat], {"x": data.images})[0]
    x = np.c_[x, np.ones(len(x))]
    head = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ np.eye(10)[data.labels])
    inits = {init.name: init for init in model.graph.initializer}
    inits["gemm9.w"].CopyFrom(numpy_helper.from_array(head[:-1].T.astype(np.float32), "gemm9.w"))
    inits["gemm9.b"].CopyFrom(numpy_helper.from_array(head[-1].astype(np.float32), "gemm9.b"))
    return model


@pytest.fixture(scope="module")
def calibration() -> ArrayDataset:
    return load_dataset("synthetic:256")


def blend_prune(model: onnx.ModelProto, data: ArrayDataset, **config: object):  # noqa: ANN201
    options = {"population": 6, "generations": 2, "progress": False, **config}
    return prune(
        model,
        PlanOptions(ratio=0.5),
        criterion="blend",
        calib=data,
        criterion_options={"config": BlendConfig(**options)},
    )


def test_blend_prunes_deterministically_and_never_below_its_best_single(calibration, tmp_path) -> None:  # noqa: ANN001
    model = fitted_model(calibration)
    parallel = blend_prune(model, calibration, workers=2, report_dir=str(tmp_path))
    inline = blend_prune(model, calibration, workers=1)
    assert parallel.verification is not None and parallel.verification.ok
    # the model written is the one the blend scored: BN recalibrated behind the removal
    assert parallel.recovery is not None and parallel.recovery.method == "bn"
    assert parallel.recovery.batchnorms and "recovery" in parallel.plan.settings
    assert parallel.removed.any() and parallel.after.params < parallel.before.params
    report = parallel.criterion_report
    assert report == inline.criterion_report | {"config": report["config"]}  # same search, any workers
    np.testing.assert_array_equal(parallel.removed, inline.removed)
    singles = report["single_fitness"]
    assert set(singles) == set(report["candidates"]) and report["fitness"] >= max(singles.values())
    assert len(set(singles.values())) > 1  # the criteria do lead to different accuracies here
    assert sum(report["factors"].values()) == pytest.approx(1.0)
    assert [g["best"] for g in report["curve"]] == sorted(g["best"] for g in report["curve"])
    assert report["skipped"] == {}
    written = json.loads((tmp_path / "blend_report.json").read_text())
    assert written["factors"] == report["factors"] and len(written["layers"]) == 2
    assert (tmp_path / "blend_fitness.png").read_bytes().startswith(PNG_MAGIC)


def test_blend_needs_calibration_data() -> None:
    with pytest.raises(CalibrationError, match="'blend' judges blends by held-out accuracy"):
        prune(hand_model(), PlanOptions(ratio=0.5), criterion="blend")
    with pytest.raises(PlanError, match="cannot contain 'blend'"):
        BlendConfig(pool=("l1", "blend")).validate()


# diagnostics ----------------------------------------------------------------------------------------
def test_criteria_command_prints_tables_and_writes_heatmaps(tmp_path, capsys) -> None:  # noqa: ANN001
    model_path = tmp_path / "model.onnx"
    onnx.save(fitted_model(load_dataset("synthetic:64")), str(model_path))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "diag"
    args = parser.parse_args(
        [
            "criteria",
            str(model_path),
            "--calib",
            "synthetic:64",
            "--criteria",
            "l1,l2,fpgm,apoz",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "conv1 (8 channels)" in printed and "mean over 2 layers" in printed and "fpgm" in printed
    summary = json.loads((out / "criteria_spearman.json").read_text())
    assert summary["criteria"] == ["l1", "l2", "fpgm", "apoz"]
    matrix = np.array(summary["mean_spearman"])
    assert matrix.shape == (4, 4) and np.allclose(np.diag(matrix), 1.0)
    assert (out / "criteria_spearman.png").read_bytes().startswith(PNG_MAGIC)
    assert len(list((out / "layers").glob("*.png"))) == 2
    args = parser.parse_args(
        ["criteria", str(model_path), "--calib", "synthetic:64", "--criteria", "l1,l2", "--json"]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)  # the JSON alone on stdout
    assert printed["criteria"] == ["l1", "l2"] and len(printed["layers"]) == 2 and printed["output"] is None


def _relu_model(dims: list[object]) -> onnx.ModelProto:
    """One Relu from an input of `dims` to an output of the same dims: no classifier."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims)
    return onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    )


def test_accuracy_refuses_a_model_that_is_not_a_classifier() -> None:
    model = _relu_model(["N", 1, 2, 2])
    data = ArrayDataset(np.ones((3, 1, 2, 2), np.float32), np.zeros(3, np.int64), 2, "maps")
    with pytest.raises(DataError, match=r"\[N, classes\]"):
        evaluate_onnx(model, data)


def test_accuracy_names_a_channels_last_model_when_the_shapes_only_differ_in_layout() -> None:
    model = _relu_model(["N", 4, 4, 3])
    nchw = ArrayDataset(np.ones((2, 3, 4, 4), np.float32), np.zeros(2, np.int64), 2, "photos")
    with pytest.raises(DataError, match=r"\(4, 4, 3\).*\(3, 4, 4\) \(a channels-last model"):
        evaluate_onnx(model, nchw)
    other = ArrayDataset(np.ones((2, 1, 4, 4), np.float32), np.zeros(2, np.int64), 2, "gray")
    with pytest.raises(DataError, match=r"\(1, 4, 4\); evaluate on matching data"):
        evaluate_onnx(model, other)
