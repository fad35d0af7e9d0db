"""Progress of long work on stderr: a tqdm bar on a terminal; plain lines elsewhere (CI logs, nohup), so
a log shows the work is alive without carriage-return clutter."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

# Seconds between two plain lines (plus one line at the end).
PLAIN_INTERVAL = 10.0


class PlainLines(tqdm):
    """tqdm that writes each refresh as its own line, and the final state once when it closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the bar: nothing to clear (and no carriage return after it)
            return False
        self.fp.write(f"{msg or self}\n")
        self.fp.flush()
        self._shown = self.n
        return True

    def close(self) -> None:
        if not self.disable and getattr(self, "_shown", None) != self.n:
            self.display()
        self.leave = False
        super().close()


def progress(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A progress bar over `iterable` (or updated by hand); kwargs go to tqdm.  A terminal gets a bar
    that leaves no line behind; any other stderr gets PlainLines every PLAIN_INTERVAL seconds."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, leave=False, **kwargs)
    return PlainLines(iterable, mininterval=PLAIN_INTERVAL, file=sys.stderr, **kwargs)
