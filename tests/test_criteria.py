"""Each criterion against a hand-computed value on the 2x2 hand model (see test_activations), the
normalisations for global ranking, Spearman, and activation criteria end to end through prune()."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Net
from onnx import numpy_helper
from test_activations import HAND_V, hand_data, hand_model, small_cnn

from graphprune.api import analyze_model, prune, score_channels
from graphprune.criteria import Criterion
from graphprune.criteria.fpgm import distance_sums
from graphprune.criteria.normalize import (
    NORMALIZATIONS,
    lamp,
    normalize,
    rank_values,
    spearman,
    spearman_matrix,
)
from graphprune.data import load_dataset
from graphprune.errors import CalibrationError, PlanError
from graphprune.planning import PlanOptions

# Statistics of the hand model's three channels on hand_data() (derived in test_activations).
HAND = {
    "l1": [0 + 1.5, 7 + 2, 8 + 1.5],  # |conv filter| + |Gemm column|
    "l2": [0 + 1.25, 25 + 2, 64 + 1.25],
    "fpgm": [5 + 8, 5 + 5, 8 + 5],  # filters (0,0) (3,4) (0,8): distances 5, 8, 5
    "mean_act": [1.0, 15 / 8, 19 / 8],
    "apoz": [1.0, 1 - 2 / 8, 1 - 3 / 8],
    "act_var": [0.0, 41 / 8 - (15 / 8) ** 2, 85 / 8 - (19 / 8) ** 2],
    "entropy": [0.0, 1.0, 1.0],
    "hrank": [1.0, 1.5, 1.0],
}


def hand_scores(criterion: str, **options: object) -> np.ndarray:
    dep = analyze_model(hand_model())
    scores = score_channels(dep, criterion, calib=hand_data(), **options)
    assert list(scores) == [0]  # the conv's 3 channels; the Gemm output is never narrowed
    return scores[0]


@pytest.mark.parametrize("criterion", sorted(HAND))
def test_criterion_matches_hand_computed_value(criterion: str) -> None:
    np.testing.assert_allclose(hand_scores(criterion), HAND[criterion], rtol=1e-6, atol=1e-9)


def test_every_issue_criterion_is_registered() -> None:
    wanted = {"l1", "l2", "fpgm", "bn", "mean_act", "apoz", "hrank", "entropy", "act_var", "taylor", "blend"}
    assert wanted <= set(Criterion.registry)


def test_taylor_matches_the_analytic_gradient() -> None:
    """logits = GAP(a) V^T, so sum over positions of a * dL/da = mean(a_c) * sum_k (p_k - y_k) V[k, c]."""
    data = hand_data()
    means = np.array([[1.0, 1.75, 1.75], [1.0, 2.0, 3.0]])  # per-image channel means
    logits = means @ HAND_V.T.astype(np.float64)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    residual = p - np.eye(2)[data.labels]
    per_image = means * (residual @ HAND_V.astype(np.float64))
    np.testing.assert_allclose(hand_scores("taylor"), np.abs(per_image.sum(axis=0)) / 2, rtol=1e-5)
    batch_abs = score_channels(
        analyze_model(hand_model()),
        "taylor",
        calib=data,
        criterion_options={"mode": "batch", "batch_size": 1},
    )[0]
    np.testing.assert_allclose(batch_abs, np.abs(per_image).sum(axis=0) / 2, rtol=1e-5)


def test_fpgm_distance_sums() -> None:
    filters = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0], [3.0, 4.0]])
    np.testing.assert_allclose(distance_sums(filters), [18, 10, 18, 10])


def test_activation_criteria_need_calibration_data() -> None:
    dep = analyze_model(hand_model())
    with pytest.raises(CalibrationError, match="criterion 'apoz' reads activations; give calibration data"):
        score_channels(dep, "apoz")
    with pytest.raises(CalibrationError, match="'taylor' needs labelled calibration data"):
        score_channels(dep, "taylor")


def test_activation_criterion_prunes_end_to_end() -> None:
    data = load_dataset("synthetic:64")
    model = small_cnn()
    result = prune(model, PlanOptions(ratio=0.5), criterion="mean_act", calib=data)
    assert result.verification is not None and result.verification.ok
    assert result.removed.any() and result.after.params < result.before.params
    # the channels removed are the least active ones of each group
    dep = result.dep
    scores = score_channels(dep, "mean_act", calib=data)
    for group in dep.prunable_groups:
        gone = np.isin(group.classes, dep.roots[result.removed])
        assert scores[group.index][gone].max() <= scores[group.index][~gone].min()


def test_rank_values_average_ties() -> None:
    np.testing.assert_array_equal(rank_values(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_lamp_by_hand() -> None:
    np.testing.assert_allclose(lamp(np.array([1.0, 2.0, 3.0, 4.0])), [1 / 10, 2 / 9, 3 / 7, 1.0])
    np.testing.assert_allclose(lamp(np.array([2.0, 2.0, 1.0])), [2 / 4, 2 / 4, 1 / 5])
    np.testing.assert_array_equal(lamp(np.zeros(3)), [0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("mean", [0.5, 1.0, 1.5]),
        ("max", [1 / 3, 2 / 3, 1.0]),
        ("sum", [1 / 6, 2 / 6, 3 / 6]),
        ("none", [1.0, 2.0, 3.0]),
        ("rank", [1 / 3, 2 / 3, 1.0]),
        ("lamp", [1 / 6, 2 / 5, 1.0]),
    ],
)
def test_normalizations(how: str, expected: list[float]) -> None:
    np.testing.assert_allclose(normalize(np.array([1.0, 2.0, 3.0]), how), expected)


def test_unknown_normalization_is_refused() -> None:
    assert set(NORMALIZATIONS) == {"mean", "max", "sum", "none", "rank", "lamp"}
    with pytest.raises(PlanError, match="unknown normalisation 'median'"):
        normalize(np.ones(3), "median")


def test_spearman() -> None:
    a = np.array([0.1, 0.5, 0.2, 0.9])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.array([1.0, 2.0, 4.0, 3.0])) == pytest.approx(0.4)  # 1 - 6*6/(4*15)
    matrix = spearman_matrix(np.vstack([a, np.ones(4)]))
    assert np.isnan(matrix[0, 1]) and np.isnan(matrix[1, 1]) and matrix[0, 0] == pytest.approx(1.0)


def test_hrank_alone_stops_after_its_images() -> None:
    """HRank is the only statistic: once its images are seen nothing is fetched (this used to crash)."""
    import onnx

    from graphprune.cli.demo import REFERENCE
    from graphprune.criteria.tensors import collect_activations

    dep = analyze_model(onnx.load(str(REFERENCE)))
    stats = collect_activations(
        dep, load_dataset("synthetic:96", "train"), statistics={"hrank"}, rank_images=32, progress=False
    )
    assert 32 <= stats.samples < 96
    assert stats.tensors


@pytest.mark.parametrize("order", [1, 2])
def test_magnitude_of_a_channel_read_by_a_grouped_conv_counts_its_group_slice_only(order: int) -> None:
    """Channel c of a tensor a group-2 conv reads enters only the filters of c's group, at c's place."""
    net = Net(channels=4, size=6)
    first = net.conv(net.x, 8)
    net.conv(net.op("Relu", [first]), 6, group=2)
    model = net.build(net.nodes[-1].output[0])
    weights = {init.name: np.abs(numpy_helper.to_array(init)) ** order for init in model.graph.initializer}
    producer, reader = weights["conv1.w"], weights["conv3.w"]  # [8, 4, 3, 3] and [6, 4, 3, 3]
    expected = producer.reshape(8, -1).sum(axis=1) + [
        reader[(c // 4) * 3 : (c // 4 + 1) * 3, c % 4].sum() for c in range(8)
    ]
    scores = score_channels(analyze_model(model), f"l{order}")
    assert list(scores) == [0]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
