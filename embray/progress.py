"""Progress of long operations: a build reports its stages and how far each has got; a front end shows it.

The library reports to a :class:`Progress` (the default, :class:`NullProgress`, shows nothing); the CLI
gives a :class:`TerminalProgress` when stderr is a terminal. Reporting never fails an operation.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """What a build reports: a stage begins (with its total, when known), work gets done, the stage ends."""

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        """A new stage begins; ``total`` items of ``unit`` are to be done (None: unknown)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more items of the current stage are done."""

    def close(self) -> None:
        """The operation ended (done or failed)."""


class NullProgress(Progress):
    """Shows nothing (the library's default)."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TerminalProgress(Progress):
    """One live line on a terminal: stage, done of total, rate, ETA; each finished stage keeps its own line."""

    def __init__(self, out: TextIO | None = None, min_interval_s: float = 0.1):
        self.out = out or sys.stderr
        self.min_interval_s = min_interval_s
        self._name: str | None = None
        self._total: int | None = None
        self._unit = ""
        self._done = 0
        self._t0 = self._shown = 0.0

    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        self._finish()
        self._name, self._total, self._unit, self._done = name, total, unit, 0
        self._t0 = time.monotonic()
        self._show(force=True)

    def advance(self, n: int = 1) -> None:
        self._done += n
        self._show()

    def close(self) -> None:
        self._finish()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        parts = [f"{self._name:<8}"]
        if self._total:
            parts.append(f"{self._done:,}/{self._total:,} {self._unit}".rstrip())
            parts.append(f"{100 * self._done / self._total:5.1f}%")
        elif self._done:
            parts.append(f"{self._done:,} {self._unit}".rstrip())
        if self._done and elapsed > 0:
            rate = self._done / elapsed
            parts.append(f"{rate:,.0f} {self._unit}/s" if rate >= 10 else f"{rate:.1f} {self._unit}/s")
            if self._total and self._done < self._total:
                parts.append(f"ETA {_duration((self._total - self._done) / rate)}")
        parts.append(_duration(elapsed))
        return "  ".join(parts)

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._name is None or (not force and now - self._shown < self.min_interval_s):
            return
        self._shown = now
        try:
            self.out.write("\r\x1b[K" + self._line())
            self.out.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the build
            pass

    def _finish(self) -> None:
        if self._name is None:
            return
        self._show(force=True)
        try:
            self.out.write("\n")
            self.out.flush()
        except (OSError, ValueError):
            pass
        self._name = None
