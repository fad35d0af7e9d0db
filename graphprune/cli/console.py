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
    """A spinner while a stage runs, then its duration."""
    start = time.perf_counter()
    with console.status(f"{label} ..."):
        yield
    console.print(f"{label:<10} done in {time.perf_counter() - start:.2f} s")
