"""A sampling profiler of one thread's Python stack (``python -m bench --stacks``).

Every ``interval_s`` a sampler thread reads the watched thread's frames. A sample counts for
the time since the previous one, so a stretch in which the sampler could not run (the GIL
held in C code, the garbage collector) is charged to what the thread was doing right after
it. Only samples with a frame named ``within`` on the stack count: the engine's admission
by default. Each is keyed by the innermost frame in the project's code and the innermost
frame of all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

ROOT = str(Path(__file__).resolve().parent.parent)


def _where(frame: FrameType) -> str:
    code = frame.f_code
    name = code.co_filename.removeprefix(ROOT + "/")
    return f"{name}:{frame.f_lineno} {code.co_name}"


class StackSampler:
    """Samples thread ``thread_id``'s stack while in use as a context manager."""

    def __init__(self, thread_id: int, *, within: str = "_admit", interval_s: float = 0.002):
        self.thread_id = thread_id
        self.within = within
        self.interval_s = interval_s
        self.ms: Counter[str] = Counter()
        self.total_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stacks", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self.thread_id)
            now = time.perf_counter()
            ms, last = (now - last) * 1000.0, now
            if frame is not None:
                self._count(frame, ms)

    def _count(self, frame: FrameType, ms: float) -> None:
        innermost, ours, inside = _where(frame), None, False
        while frame is not None:
            filename = frame.f_code.co_filename
            if ours is None and filename.startswith(ROOT) and "site-packages" not in filename:
                ours = _where(frame)
            inside = inside or frame.f_code.co_name == self.within
            frame = frame.f_back
        if inside:
            self.total_ms += ms
            self.ms[f"{ours} <- {innermost}" if ours != innermost else innermost] += ms

    def top(self, count: int = 25) -> list[dict[str, float | str]]:
        """The ``count`` places that took the most time, in ms."""
        return [{"where": where, "ms": ms} for where, ms in self.ms.most_common(count)]
