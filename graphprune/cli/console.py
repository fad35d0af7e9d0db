"""The CLI's consoles (results on stdout, progress and errors on stderr) and the stage timer: a leaf
module that every command module imports, so command modules never import each other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


@contextmanager
def stage(label: str) -> Iterator[None]:
    """A line when a stage starts and one with its duration when it ends.  No spinner: a live display
    re-prints the progress bars drawn under it (duplicate lines), and a log file gets nothing from it."""
    start = time.perf_counter()
    console.print(f"{label:<10} ...")
    yield
    console.print(f"{label:<10} done in {time.perf_counter() - start:.2f} s")
