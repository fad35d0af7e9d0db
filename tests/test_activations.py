"""Calibration activations: which tensors judge a group, hand-computed statistics on a 2x2 model,
streaming equal to the all-in-memory computation, bounded state, and clear errors on bad data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import Net
from onnx import TensorProto, helper

from graphprune.api import analyze_model
from graphprune.criteria.tensors import activation_tensors, collect_activations
from graphprune.data import ArrayDataset, load_dataset
from graphprune.errors import CalibrationError
from graphprune.runtime.activations import HISTOGRAM_MARGIN, STATISTICS
from graphprune.runtime.session import make_session

# The hand model: conv 1x1 (2 -> 3 channels) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (3 -> 2).
HAND_W = np.array([[0, 0], [3, 4], [0, 8]], dtype=np.float32)  # conv filters, one row per channel
HAND_B = np.array([1, 0, -1], dtype=np.float32)
HAND_V = np.array([[1, -1, 0.5], [0.5, 1, -1]], dtype=np.float32)  # Gemm weight [classes, channels]


def hand_model(*, second_input: bool = False) -> onnx.ModelProto:
    """Channel 0 is relu(1) = 1 everywhere, channel 1 relu(3 x0 + 4 x1), channel 2 relu(8 x1 - 1)."""
    net = Net(channels=2, size=2)
    x = net.x
    if second_input:
        net.input = [net.input, helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2, 2, 2])]
        x = net.op("Add", [net.x, "z"])
    w = net.const(HAND_W.reshape(3, 2, 1, 1), "conv.w")
    b = net.const(HAND_B, "conv.b")
    relu = net.op("Relu", [net.op("Conv", [x, w, b], name="conv", kernel_shape=[1, 1])], name="relu")
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [relu])])
    v = net.const(HAND_V, "fc.w")
    c = net.const(np.zeros(2), "fc.b")
    out = net.op("Gemm", [flat, v, c], name="fc", transB=1)
    if second_input:
        graph = helper.make_graph(
            net.nodes,
            "two",
            net.input,
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 2])],
            net.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return net.build(out)


def hand_data() -> ArrayDataset:
    """Image A: x0 one-hot top-left, x1 one-hot bottom-right; image B: x0 = 0, x1 = 0.5."""
    a = np.zeros((2, 2, 2), dtype=np.float32)
    a[0, 0, 0], a[1, 1, 1] = 1.0, 1.0
    b = np.zeros((2, 2, 2), dtype=np.float32)
    b[1] = 0.5
    return ArrayDataset(np.stack([a, b]), np.array([0, 1]), 2, "hand")


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv-BN-Relu stem, a residual conv-BN-Relu added to it, a strided conv-BN-Relu, GAP, Gemm."""
    net = Net(channels=1, size=28, seed=seed)
    stem = net.stem(6)
    branch = net.op("Relu", [net.bn(net.conv(stem, 6))])
    joined = net.op("Add", [stem, branch])
    down = net.op("Relu", [net.bn(net.conv(joined, 8, stride=2))])
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [down])])
    return net.build(net.gemm(flat, 10))


def test_judged_tensors_are_the_maps_after_bn_and_activation() -> None:
    dep = analyze_model(small_cnn())
    judged = {dep.groups[index].name: tensors for index, tensors in activation_tensors(dep).items()}
    # The residual group is judged by the stem's map after BN/Relu and by the sum the branch's map
    # flows into (the stream the strided conv reads); the strided conv by its map after BN/Relu.
    assert judged == {"conv1": ["relu3", "add7"], "conv8": ["relu10"]}
    assert activation_tensors(analyze_model(hand_model())) == {0: ["relu"]}


def test_hand_computed_statistics() -> None:
    stats = collect_activations(analyze_model(hand_model()), hand_data(), bins=4, progress=False)
    relu = stats.tensors["relu"]
    assert stats.samples == 2 and relu.images == 2
    np.testing.assert_allclose(relu.value("mean_abs"), [1.0, 15 / 8, 19 / 8])
    np.testing.assert_allclose(relu.value("apoz"), [0.0, 2 / 8, 3 / 8])
    np.testing.assert_allclose(relu.value("variance"), [0.0, 41 / 8 - (15 / 8) ** 2, 85 / 8 - (19 / 8) ** 2])
    # per-image means: ch0 (1, 1) one bin; ch1 (1.75, 2) and ch2 (1.75, 3) two bins each -> 1 bit
    np.testing.assert_allclose(relu.value("entropy"), [0.0, 1.0, 1.0])
    # ranks: ch0 ones (1, 1); ch1 diag(3, 4) and all-2 (2, 1); ch2 one 7 and all-3 (1, 1)
    np.testing.assert_allclose(relu.value("hrank"), [1.0, 1.5, 1.0])


def in_memory_statistics(values: np.ndarray, first_batch: int, bins: int) -> dict[str, np.ndarray]:
    """The same statistics from every activation at once (what streaming must reproduce)."""
    a = values.astype(np.float64)
    per_image = a.mean(axis=(2, 3))
    first = per_image[:first_batch]
    width = (first.max() - first.min()) / bins
    low = first.min() - HISTOGRAM_MARGIN * bins * width
    total_bins = bins * (1 + 2 * HISTOGRAM_MARGIN)
    index = np.clip(np.floor((per_image - low) / width), 0, total_bins - 1).astype(int)
    entropy = []
    for channel in range(a.shape[1]):
        p = np.bincount(index[:, channel], minlength=total_bins) / len(a)
        entropy.append(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {
        "mean_abs": np.abs(a).mean(axis=(0, 2, 3)),
        "apoz": (a == 0).mean(axis=(0, 2, 3)),
        "variance": a.var(axis=(0, 2, 3)),
        "entropy": np.array(entropy),
        "hrank": np.linalg.matrix_rank(values.astype(np.float32)).mean(axis=0),
    }


def test_streaming_equals_all_in_memory() -> None:
    dep = analyze_model(small_cnn())
    data = load_dataset("synthetic:256")
    batch, bins = 48, 16  # 5 full batches and a last one of 16
    stats = collect_activations(dep, data, batch_size=batch, bins=bins, rank_images=None, progress=False)
    names = list(stats.tensors)
    session = make_session(dep.model, extra_outputs=names)
    outputs = [session.run(names, {"x": x}) for x, _ in data.batches(batch)]
    for i, name in enumerate(names):
        values = np.concatenate([out[i] for out in outputs])
        expected = in_memory_statistics(values, batch, bins)
        for statistic in STATISTICS:
            np.testing.assert_allclose(
                stats.tensors[name].value(statistic),
                expected[statistic],
                rtol=1e-5,
                atol=1e-7,
                err_msg=statistic,
            )


def test_state_is_bounded_and_samples_limit_the_stream() -> None:
    dep = analyze_model(small_cnn())
    data = load_dataset("synthetic:256")
    few = collect_activations(dep, data, samples=40, batch_size=32, progress=False)
    many = collect_activations(dep, data, batch_size=32, progress=False)
    assert few.samples == 40 and many.samples == 256
    for name in many.tensors:
        small, large = few.tensors[name], many.tensors[name]
        for attribute in ("sum_abs", "zeros", "mean", "m2", "histogram", "rank_sum"):
            assert getattr(small, attribute).shape == getattr(large, attribute).shape
    # the first 40 images, streamed from a plain iterable of arrays, give the same numbers
    head = collect_activations(dep, [data.images[:32], data.images[32:40]], progress=False)
    for name in many.tensors:
        np.testing.assert_allclose(head.tensors[name].value("mean_abs"), few.tensors[name].value("mean_abs"))


def test_only_requested_statistics_are_collected() -> None:
    stats = collect_activations(analyze_model(hand_model()), hand_data(), statistics=["apoz"], progress=False)
    assert stats.statistics == {"apoz"}
    with pytest.raises(CalibrationError, match="'hrank' .* was not collected"):
        stats.tensors["relu"].value("hrank")
    with pytest.raises(CalibrationError, match="unknown activation statistic"):
        collect_activations(analyze_model(hand_model()), hand_data(), statistics=["median"], progress=False)


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([np.zeros((2, 3, 2, 2), np.float32)], "have 3 channels but model input 'x' expects 2"),
        ([np.zeros((2, 2, 4, 4), np.float32)], "shape \\(2, 2, 4, 4\\) .* resize"),
        ([np.zeros((2, 2, 2), np.float32)], "has rank 4"),
        ([np.zeros((2, 2, 2, 2), bool)], "dtype bool"),
        ([], "holds no image"),
    ],
)
def test_bad_calibration_data_is_one_clear_error(batches: list[np.ndarray], message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        collect_activations(analyze_model(hand_model()), batches, progress=False)


def test_models_with_two_inputs_are_refused() -> None:
    with pytest.raises(CalibrationError, match="one image tensor, but the model has 2 inputs"):
        collect_activations(analyze_model(hand_model(second_input=True)), hand_data(), progress=False)
