"""Report helpers: number formats, comparison tables, and PNG plots."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.errors import GraphPruneError
from graphprune.report.plots import (
    accuracy_vs_macs_figure,
    channels_figure,
    curve_figure,
    heatmap_figure,
    plot_accuracy_vs_macs,
    plot_channels,
    plot_curve,
    plot_heatmap,
)
from graphprune.report.tables import comparison_table, fmt_count, fmt_ms, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (4.114e9, "4.11 G"),
        (25_557_032, "25.6 M"),
        (320_000, "320 K"),
        (999_700, "1.00 M"),
        (512, "512"),
        (0, "0"),
    ],
)
def test_fmt_count(n: float, text: str) -> None:
    assert fmt_count(n) == text


@pytest.mark.parametrize(
    ("ms", "text"), [(0.0523, "0.052 ms"), (9.7, "9.70 ms"), (18.84, "18.8 ms"), (240.4, "240 ms")]
)
def test_fmt_ms(ms: float, text: str) -> None:
    assert fmt_ms(ms) == text


def test_comparison_table_renders_speedup_and_gaps() -> None:
    rows = {
        "before": {"macs": 4.11e9, "params": 25.6e6, "latency_ms": 18.8, "accuracy": 0.9257},
        "after": {"macs": 2.05e9, "params": 13.9e6, "latency_ms": 9.7},
    }
    text = render(comparison_table(rows, title="resnet50"))
    lines = [line.split() for line in text.splitlines() if line.strip()]
    assert lines[0] == ["resnet50"]
    assert lines[1] == ["MACs", "params", "latency", "speed-up", "accuracy"]
    assert lines[-2] == ["before", "4.11", "G", "25.6", "M", "18.8", "ms", "1.00x", "92.57", "%"]
    assert lines[-1] == ["after", "2.05", "G", "13.9", "M", "9.70", "ms", "1.94x", "-"]
    assert "\x1b[" not in text


def test_comparison_table_omits_absent_columns_and_rejects_unknown_metrics() -> None:
    text = render(comparison_table({"a": {"macs": 1e6, "accuracy": None}}))
    assert "MACs" in text and "accuracy" not in text and "speed-up" not in text
    with pytest.raises(GraphPruneError, match="latency"):
        comparison_table({"a": {"latency": 3.0}})


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_plots_write_png_files(tmp_path) -> None:
    before = {f"layer{i}": 64 for i in range(12)}
    after = {name: 64 - 4 * i for i, name in enumerate(before)}
    for name, make in {
        "channels.png": lambda p: plot_channels(before, after, p, "ResNet channels"),
        "acc.png": lambda p: plot_accuracy_vs_macs(
            [
                {"label": "dense", "macs": 41e6, "accuracy": 0.93},
                {"label": "l1 50%", "macs": 20e6, "accuracy": 0.91, "series": "l1"},
                {"label": "l1 30%", "macs": 29e6, "accuracy": 0.92, "series": "l1"},
            ],
            p,
        ),
        "heat.png": lambda p: plot_heatmap(np.eye(3), ["l1", "l2", "bn"], p, "rank correlation"),
        "curve.png": lambda p: plot_curve([1, 2, 3], [0.5, 0.3, 0.2], p, "loss", "epoch", "loss"),
    }.items():
        path = tmp_path / name.removesuffix(".png") / name
        assert make(path) == path
        _assert_png(path)


def test_channel_bars_show_before_and_after_per_layer() -> None:
    before = {"conv1": 16, "conv2": 32, "fc": 10}
    after = {"conv1": 8, "conv2": 20}
    (ax,) = channels_figure(before, after, "title").axes
    bars = {container.get_label(): [bar.get_height() for bar in container] for container in ax.containers}
    assert bars == {"before": [16, 32, 10], "after": [8, 20, 0]}
    assert [label.get_text() for label in ax.get_xticklabels()] == ["conv1", "conv2", "fc"]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["before", "after"]
    assert ax.get_title() == "title"


def test_accuracy_points_are_joined_per_series_in_macs_order() -> None:
    points = [
        {"label": "dense", "macs": 41e6, "accuracy": 0.93},
        {"label": "l1 30%", "macs": 29e6, "accuracy": 0.92, "series": "l1"},
        {"label": "l1 50%", "macs": 20e6, "accuracy": 0.91, "series": "l1"},
    ]
    (ax,) = accuracy_vs_macs_figure(points).axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert lines["l1"] == ([20e6, 29e6], pytest.approx([91.0, 92.0]))
    assert ([41e6], pytest.approx([93.0])) in lines.values()
    assert sorted(text.get_text() for text in ax.texts) == ["dense", "l1 30%", "l1 50%"]


def test_heatmap_and_curve_show_their_data() -> None:
    matrix = np.array([[1.0, 0.2], [0.2, 1.0]])
    heat = heatmap_figure(matrix, ["l1", "bn"], "rank correlation").axes[0]
    np.testing.assert_array_equal(heat.images[0].get_array(), matrix)
    assert [label.get_text() for label in heat.get_yticklabels()] == ["l1", "bn"]
    (ax,) = curve_figure([1, 2, 3], [0.5, 0.3, 0.2], "loss", "epoch", "loss").axes
    (line,) = ax.lines
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [0.5, 0.3, 0.2]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", "loss")


def test_plot_inputs_are_checked(tmp_path) -> None:
    with pytest.raises(GraphPruneError, match="square"):
        plot_heatmap(np.ones((2, 3)), ["a", "b"], tmp_path / "h.png")
    with pytest.raises(GraphPruneError, match="equal lengths"):
        plot_curve([1, 2], [1], tmp_path / "c.png", "t", "x", "y")
    assert not list(tmp_path.iterdir())
