"""Shared helpers for the benchmark scripts: machine description, timing, error records, result files, plots.

The scripts import this module as `common` (Python puts the script's folder on sys.path), so it stays
outside the graphprune package and never ships with it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from graphprune.onnxutil import atomic_write

T = TypeVar("T")
log = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"
_PACKAGES = ("graphprune", "onnx", "onnxruntime", "torch", "torchvision", "torch-pruning", "numpy")


def machine() -> dict[str, object]:
    """What the numbers were measured on: CPU model, cores, GPU (when torch is loaded and sees one),
    package versions, date."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: Mapping[str, object]) -> str:
    """One markdown line naming the machine and the versions that matter for the numbers."""
    versions = info["versions"]
    assert isinstance(versions, dict)
    names = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return f"Machine: {info['cpu']}, {info['cores']} cores{gpu}, Python {info['python']}; {names}; {info['date']}."


def header(title: str, info: Mapping[str, object], doc: str) -> list[str]:
    """The opening lines of a results file: its title, the machine line, and the protocol, which is the
    script's docstring without its first and last paragraphs (the summary line and how to run it)."""
    return [f"# {title}\n", machine_line(info), "", doc.split("\n\n", 1)[1].rsplit("\n\n", 1)[0].strip(), ""]


@contextlib.contextmanager
def high_priority(enabled: bool) -> Iterator[None]:
    """Run the block with this process's scheduler group at nice -20, then restore it.

    On Linux with autogroup scheduling (the default), `nice` only ranks processes within one session,
    so on a machine shared with other jobs a 2-thread onnxruntime session is stalled whenever a thread
    is descheduled; raising the session's autogroup makes timings those of an idle machine. Needs root;
    without it (or on another OS) a warning is logged and the block runs at normal priority.
    """
    knob = Path("/proc/self/autogroup")
    old = None
    if enabled:
        try:
            old = knob.read_text().split("nice")[-1].strip()
            knob.write_text("-20")
        except (OSError, IndexError) as exc:
            log.warning("cannot raise the scheduler priority (%s); timing at normal priority", exc)
            old = None
    try:
        yield
    finally:
        if old is not None:
            knob.write_text(old)


def best_of(repeats: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Best wall time of `repeats` calls of `fn` and the value of the last call."""
    best = float("inf")
    value: T | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    assert value is not None
    return best, value


@dataclass
class Failure:
    """An exception caught by a benchmark stage, kept for the results file."""

    stage: str
    error: str
    where: str

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException) -> Failure:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
        message = " ".join(str(exc).split())
        return cls(stage, f"{type(exc).__name__}: {message[:400]}", where)


def write_json(path: Path, payload: object) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def save_and_print(folder: Path, stem: str, payload: dict, render: Callable[[dict], str]) -> None:
    """FOLDER/STEM.json and the markdown rendered from the payload (each written atomically); the
    markdown is printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{stem}.json", payload)
    text = render(payload)
    write_text(folder / f"{stem}.md", text)
    print(text)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Series:
    """One line or scatter of a plot; `labels` annotate the points when given."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    labels: Sequence[str] = ()
    line: bool = True
    marker: str = "o"


def plot_series(
    series: Sequence[Series],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    loglog: bool = False,
    xticks: Mapping[float, str] | None = None,
) -> Path:
    """Lines/scatters on the Agg canvas (no pyplot, no global backend), written atomically as PNG;
    `xticks` names categories placed at those x positions."""
    fig = Figure(figsize=(7.5, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for item in series:
        ax.plot(
            item.xs,
            item.ys,
            marker=item.marker,
            markersize=7 if not item.line else 4,
            linestyle="-" if item.line else "none",
            label=item.name,
        )
        for label, x, y in zip(item.labels, item.xs, item.ys, strict=False):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    if xticks:
        ax.set_xticks(list(xticks), list(xticks.values()))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
