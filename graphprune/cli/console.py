"""The CLI's consoles (results on stdout, progress and errors on stderr) and the stage timer: a leaf
module that every command module imports, so command modules never import each other."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)
# Seconds a stage runs before it says so.
STAGE_NOTICE_S = 2.0
out = Console(highlight=False)


@contextmanager
def stage(label: str) -> Iterator[None]:
    """A line when a stage has run for STAGE_NOTICE_S (long work shows it is alive, a quick failure
    stays one line) and one with its duration when it ends.  No spinner: a live display re-prints the
    progress bars drawn under it (duplicate lines), and a log file gets nothing from it."""
    start = time.perf_counter()
    notice = threading.Timer(STAGE_NOTICE_S, console.print, (f"{label:<10} ...",))
    notice.daemon = True
    notice.start()
    try:
        yield
    finally:
        notice.cancel()
    console.print(f"{label:<10} done in {time.perf_counter() - start:.2f} s")


def print_results(as_json: bool, numbers: dict[str, Any] | list[Any], human: Callable[[], None]) -> None:
    """A command's results on stdout: `numbers` as one JSON value with --json, else `human()`'s lines."""
    if as_json:
        out.print_json(json.dumps(numbers))
    else:
        human()
