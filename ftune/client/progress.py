"""A one-line progress bar on stderr, so the client needs nothing but httpx."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class ProgressBar:
    """``update(done)`` redraws at most ten times a second; ``close()`` ends the line.
    Silent when ``stream`` is not a terminal, unless ``force``."""

    def __init__(self, label: str, total: int | None, *, stream: TextIO | None = None,
                 force: bool = False) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.done, self._drawn_at = 0, 0.0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            share = min(1.0, self.done / self.total)
            bar = "#" * round(share * WIDTH)
            text = f"{self.label} [{bar:<{WIDTH}}] {share:4.0%} {_size(self.done)}"
        else:
            text = f"{self.label} {_size(self.done)}"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
