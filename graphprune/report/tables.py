"""Before/after comparison tables (rich) and the number formats every report shares."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import PurePath

from rich import box
from rich.console import Console
from rich.table import Table

from graphprune.errors import GraphPruneError

Metrics = Mapping[str, float | int | None]

METRICS = ("macs", "params", "predicted_ms", "latency_ms", "accuracy")
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def fmt_count(n: float) -> str:
    """Three significant digits with a unit: 4.11 G, 25.6 M, 320 K, 512."""
    for scale, unit in _UNITS:
        if abs(n) >= 0.9995 * scale:  # so 999.7 K reads 1.00 M rather than 1000 K
            return f"{_three_digits(n / scale)} {unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def fmt_ms(ms: float) -> str:
    """Milliseconds with three significant digits (0.052 ms, 9.70 ms, 18.8 ms, 240 ms)."""
    return f"{_three_digits(ms) if ms >= 1 else f'{ms:.3f}'} ms"


def fmt_speedup(ratio: float) -> str:
    """A speed-up or reduction factor: 1.94x."""
    return f"{ratio:.2f}x"


def comparison_table(rows: Mapping[str, Metrics], *, title: str | None = None) -> Table:
    """One row per label, in the given order; speed-up is the first row's latency over each row's.

    Metrics per row (all optional): macs, params, predicted_ms (a latency model's prediction),
    latency_ms (measured), accuracy (a fraction in [0, 1]). A column
    appears when any row has its metric; a row lacking it shows "-".
    """
    for label, metrics in rows.items():
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise GraphPruneError(f"Row {label!r} has unknown metrics {unknown}; use {', '.join(METRICS)}.")
    present = {key for metrics in rows.values() for key, value in metrics.items() if value is not None}
    baseline = next(iter(rows.values()), {}).get("latency_ms")
    columns: list[tuple[str, str]] = [
        (key, header)
        for key, header in (
            ("macs", "MACs"),
            ("params", "params"),
            ("predicted_ms", "predicted"),
            ("latency_ms", "latency"),
        )
        if key in present
    ]
    if baseline:
        columns.append(("speedup", "speed-up"))
    if "accuracy" in present:
        columns.append(("accuracy", "accuracy"))

    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("")
    for _, header in columns:
        table.add_column(header, justify="right")
    for label, metrics in rows.items():
        table.add_row(label, *(_cell(key, metrics, baseline) for key, _ in columns))
    return table


def short_names(paths: list[str]) -> list[str]:
    """Each path's shortest trailing part that no other (different) path shares: a/m.onnx, b/m.onnx."""
    parts = [PurePath(p).parts for p in paths]
    names = []
    for own in parts:
        others = {other for other in parts if other != own}
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] for other in others):
            depth += 1
        names.append(str(PurePath(*own[-depth:])))
    return names


def render(table: Table, width: int = 120) -> str:
    """Plain text of a table (no colour codes) for the CLI, logs and markdown code blocks."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()


def _cell(key: str, metrics: Metrics, baseline: float | None) -> str:
    latency = metrics.get("latency_ms")
    if key == "speedup":
        return fmt_speedup(baseline / latency) if baseline and latency else "-"
    value = metrics.get(key)
    if value is None:
        return "-"
    if key in ("latency_ms", "predicted_ms"):
        return fmt_ms(value)
    if key == "accuracy":
        return f"{100 * value:.2f} %"
    return fmt_count(value)


def _three_digits(value: float) -> str:
    magnitude = abs(value)
    decimals = 2 if magnitude < 10 else 1 if magnitude < 100 else 0
    return f"{value:.{decimals}f}"
