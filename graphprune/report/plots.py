"""PNG figures for reports: channels per layer, accuracy vs MACs, heatmaps, curves.

Each `*_figure` function builds a Figure (so tests can read the plotted data) and its `plot_*` twin
writes it. Figures are built with matplotlib's object API on the Agg canvas, never pyplot, so plotting
needs no display, leaves the global backend alone and leaks no figures; each file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from graphprune.errors import GraphPruneError
from graphprune.onnxutil import atomic_write
from graphprune.report.tables import fmt_count

PathLike = str | os.PathLike[str]

_DPI = 120


def plot_channels(
    before: Mapping[str, int], after: Mapping[str, int], path: PathLike, title: str = "Channels per layer"
) -> Path:
    """Write `channels_figure` as PNG."""
    return _save(channels_figure(before, after, title), path)


def channels_figure(
    before: Mapping[str, int], after: Mapping[str, int], title: str = "Channels per layer"
) -> Figure:
    """Grouped bars of each layer's channel count before and after pruning (layers in `before` order)."""
    layers = list(dict.fromkeys([*before, *after]))
    x = np.arange(len(layers))
    fig = _figure(width=min(max(6.0, 0.28 * len(layers)), 40.0), height=4.5)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [before.get(name, 0) for name in layers], width=0.4, label="before")
    ax.bar(x + 0.2, [after.get(name, 0) for name in layers], width=0.4, label="after")
    ax.set_xticks(x, layers, rotation=90, fontsize=6 if len(layers) > 40 else 8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend()
    return fig


def plot_accuracy_vs_macs(
    points: Sequence[Mapping[str, object]], path: PathLike, title: str = "Accuracy vs MACs"
) -> Path:
    """Write `accuracy_vs_macs_figure` as PNG."""
    return _save(accuracy_vs_macs_figure(points, title), path)


def accuracy_vs_macs_figure(
    points: Sequence[Mapping[str, object]], title: str = "Accuracy vs MACs"
) -> Figure:
    """Scatter of accuracy (fraction in [0, 1], shown in %) against MACs, each point labelled.

    Points sharing an optional "series" key (say, one criterion at several ratios) are joined by a line
    in MACs order and share a legend entry.
    """
    fig = _figure(width=6.5, height=4.5)
    ax = fig.add_subplot()
    series: dict[object, list[Mapping[str, object]]] = {}
    for point in points:
        series.setdefault(point.get("series"), []).append(point)
    for name, members in series.items():
        ordered = sorted(members, key=lambda p: float(p["macs"]))
        xs = [float(p["macs"]) for p in ordered]
        ys = [100 * float(p["accuracy"]) for p in ordered]
        ax.plot(xs, ys, marker="o", linestyle="-" if name is not None else "none", label=name)
        for p, x_value, y_value in zip(ordered, xs, ys, strict=True):
            ax.annotate(
                str(p["label"]), (x_value, y_value), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: fmt_count(value)))
    ax.set_xlabel("MACs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(name is not None for name in series):
        ax.legend()
    return fig


def plot_heatmap(
    matrix: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[str], path: PathLike, title: str = ""
) -> Path:
    """Write `heatmap_figure` as PNG."""
    return _save(heatmap_figure(matrix, labels, title), path)


def heatmap_figure(
    matrix: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[str], title: str = ""
) -> Figure:
    """A labelled square matrix (say, rank correlation between criteria), values written in small ones."""
    values = np.asarray(matrix, dtype=float)
    if values.shape != (len(labels), len(labels)):
        raise GraphPruneError(
            f"Heatmap matrix has shape {values.shape} but there are {len(labels)} labels; pass a square "
            "matrix with one label per row."
        )
    size = max(4.0, 0.5 * len(labels) + 2.0)
    fig = _figure(width=size + 1.0, height=size)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    if len(labels) <= 12:
        middle = (np.nanmin(values) + np.nanmax(values)) / 2
        for (row, col), value in np.ndenumerate(values):
            colour = "black" if value > middle else "white"
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_title(title)
    return fig


def plot_curve(
    xs: Sequence[float], ys: Sequence[float], path: PathLike, title: str, xlabel: str, ylabel: str
) -> Path:
    """Write `curve_figure` as PNG."""
    return _save(curve_figure(xs, ys, title, xlabel, ylabel), path)


def curve_figure(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str) -> Figure:
    """A single line with markers (loss per epoch, accuracy per pruning step ...)."""
    if len(xs) != len(ys):
        raise GraphPruneError(
            f"Curve {title!r} has {len(xs)} x values but {len(ys)} y values; pass equal lengths."
        )
    fig = _figure(width=6.5, height=4.0)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    """Write the figure as PNG via a temp file (its suffix is .tmp, hence the explicit format)."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
