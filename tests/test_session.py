"""onnxruntime sessions: extra outputs, external data, providers, and generated inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphPruneError, InvalidModelError
from graphprune.runtime import session as session_module
from graphprune.runtime.session import input_feed, make_session


def _conv_relu(batch_dim: int | str = "batch") -> onnx.ModelProto:
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 8, 8, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The conv output computed in numpy."""
    weight = numpy_helper.to_array(model.graph.initializer[0])
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.einsum("bchwij,ocij->bohw", windows, weight)


def test_extra_outputs_fetch_intermediates_without_touching_the_model() -> None:
    model = _conv_relu()
    before = model.SerializeToString()
    session = make_session(model, extra_outputs=["c"])
    assert [out.name for out in session.get_outputs()] == ["y", "c"]
    x = input_feed(model, 2, seed=3)["x"]
    y, c = session.run(None, {"x": x})
    np.testing.assert_allclose(c, _reference(model, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y, np.maximum(c, 0))
    assert model.SerializeToString() == before


def test_external_data_path_with_extra_outputs(tmp_path, monkeypatch) -> None:
    model = _conv_relu()
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(
        _conv_relu(), str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
    )
    assert (folder / "m.data").stat().st_size == 8 * 3 * 3 * 3 * 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data must resolve against the model's folder, not the cwd
    x = input_feed(folder / "m.onnx", 1, seed=0)
    plain = make_session(folder / "m.onnx").run(None, x)[0]
    y, c = make_session(str(folder / "m.onnx"), extra_outputs=["c"]).run(None, x)
    np.testing.assert_array_equal(plain, y)
    np.testing.assert_allclose(c, _reference(model, x["x"]), rtol=1e-4, atol=1e-4)


def test_oversized_model_is_staged_through_external_data(monkeypatch) -> None:
    monkeypatch.setattr(session_module, "_PROTO_LIMIT", 0)
    model = _conv_relu()
    session = make_session(model, extra_outputs=["c", "y"])
    assert [out.name for out in session.get_outputs()] == ["y", "c"]
    assert model.graph.initializer[0].HasField("raw_data")  # the caller's weights were not externalised


def test_unknown_extra_output_is_refused() -> None:
    with pytest.raises(GraphPruneError, match="nope"):
        make_session(_conv_relu(), extra_outputs=["nope"])


def test_provider_and_thread_errors() -> None:
    with pytest.raises(GraphPruneError, match="'tpu'"):
        make_session(_conv_relu(), provider="tpu")
    with pytest.raises(GraphPruneError, match="Thread count 0"):
        make_session(_conv_relu(), threads=0)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(GraphPruneError, match="onnxruntime-gpu"):
            make_session(_conv_relu(), provider="cuda")


def test_threads_are_applied() -> None:
    session = make_session(_conv_relu(), threads=1)
    assert session.get_session_options().intra_op_num_threads == 1


def test_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(InvalidModelError, match="does not exist"):
        make_session(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xff not a model")
    with pytest.raises(InvalidModelError):
        make_session(garbage)
    with pytest.raises(InvalidModelError):
        make_session(garbage, extra_outputs=["c"])


def test_input_feed_resolves_dims_and_is_seeded() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["image"], ["out"]),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
        ],
        "feed",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["N", 3, "H", 7]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, "T"]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, None)],
        [numpy_helper.from_array(np.zeros(4, np.float32), "w")],  # an initialiser listed as input
    )
    model = helper.make_model(graph)
    feed = input_feed(model, 5, seed=1)
    assert sorted(feed) == ["ids", "image"]
    assert feed["image"].shape == (5, 3, 1, 7) and feed["image"].dtype == np.float16
    assert feed["ids"].shape == (2, 1) and feed["ids"].dtype == np.int64  # fixed leading dim kept
    assert ((feed["ids"] >= 0) & (feed["ids"] < 8)).all()
    again = input_feed(model, 5, seed=1)
    np.testing.assert_array_equal(feed["image"], again["image"])
    assert not np.array_equal(feed["image"], input_feed(model, 5, seed=2)["image"])


def test_top_k_counts_rank_the_right_class_as_argmax_breaks_ties() -> None:
    from onnx import TensorProto, helper

    from graphprune.data import ArrayDataset
    from graphprune.runtime.evaluate import evaluate_onnx, top_k_correct

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    flat = helper.make_node("Flatten", ["x"], ["y"])
    model = helper.make_model(
        helper.make_graph([flat], "scores", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.2, 0.2], [0.1, 0.4, 0.3, 0.4]], np.float32)
    data = ArrayDataset(scores[:, None, None, :], np.array([2, 0, 3]), 4, "scores")
    # ranks: 1 (0.9 above), 0 (ties, first), 1 (tied with class 1, which argmax picks)
    assert top_k_correct(model, data, ks=(1, 2, 5)) == [1, 3, 3]
    assert evaluate_onnx(model, data) == pytest.approx(1 / 3)
