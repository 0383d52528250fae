"""Timestamped log lines and a small progress line, both on stderr (and in the run's log file)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_START = time.monotonic()
_lock = threading.Lock()
_log_file: TextIO | None = None


def set_log_file(path: Path | None) -> None:
    """Also append every log line to ``path`` (None: stop)."""
    global _log_file
    with _lock:
        if _log_file is not None:
            _log_file.close()
        _log_file = path.open("a", encoding="utf-8") if path is not None else None


def elapsed() -> float:
    """Seconds since this module was imported (about when the run started)."""
    return time.monotonic() - _START


def log(message: str) -> None:
    """Print ``[HH:MM:SS +elapsed] message`` to stderr and the log file."""
    line = f"[{time.strftime('%H:%M:%S')} +{elapsed():6.1f}s] {message}"
    with _lock:
        print(line, file=sys.stderr, flush=True)
        if _log_file is not None:
            _log_file.write(line + "\n")
            _log_file.flush()


class Progress:
    """A progress line for ``total`` items: redrawn in place on a terminal, else printed at
    most every ``every_s`` seconds, so captured output stays short."""

    def __init__(self, label: str, total: int, *, every_s: float = 10.0) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._t0 = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._every_s = 0.5 if self._tty else every_s
        self._last = 0.0
        self._lock = threading.Lock()

    def advance(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more items done; redraw if it is time."""
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last >= self._every_s or self.done >= self.total:
                self._last = now
                self._draw(note)

    def _draw(self, note: str) -> None:
        spent = time.monotonic() - self._t0
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        eta = spent / frac - spent if frac > 0 else float("nan")
        text = (
            f"{self.label} [{bar}] {self.done}/{self.total} {spent:5.1f}s "
            f"eta {eta:5.1f}s run +{elapsed():.0f}s {note}"
        )
        with _lock:
            if self._tty:
                print("\r" + text[:150].ljust(150), end="", file=sys.stderr, flush=True)
            else:
                print("  " + text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the line on a terminal."""
        if self._tty:
            with _lock:
                print(file=sys.stderr, flush=True)
