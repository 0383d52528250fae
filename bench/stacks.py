"""A sampling profiler of the loop thread's Python stack (``python -m bench --stacks``).

Every ``interval_s`` a sampler thread reads the watched thread's frames. A sample counts for
the time since the previous one, so a stretch in which the sampler could not run (the GIL
held in C code, the garbage collector) is charged to what the thread was doing right after
it. Each sample goes to the first phase of :data:`PHASES` with a frame of that name on the
stack (else "other": the loop, the executor, the bench), keyed by the innermost frame in the
project's code and the innermost frame of all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

ROOT = str(Path(__file__).resolve().parent.parent)
#: The engine's phases by the method that runs them, checked in this order.
PHASES = {"_admit": "admitting", "_read": "reading", "_launch": "launching a decode step"}
OTHER = "other"


def _where(frame: FrameType) -> str:
    code = frame.f_code
    name = code.co_filename.removeprefix(ROOT + "/")
    return f"{name}:{frame.f_lineno} {code.co_name}"


class StackSampler:
    """Samples thread ``thread_id``'s stack while in use as a context manager."""

    def __init__(self, thread_id: int, *, interval_s: float = 0.002) -> None:
        self.thread_id = thread_id
        self.interval_s = interval_s
        self.ms: dict[str, Counter[str]] = {phase: Counter() for phase in [*PHASES.values(), OTHER]}
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
        innermost, ours, names = _where(frame), None, set()
        while frame is not None:
            filename = frame.f_code.co_filename
            if ours is None and filename.startswith(ROOT) and "site-packages" not in filename:
                ours = _where(frame)
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        phase = next((phase for name, phase in PHASES.items() if name in names), OTHER)
        self.ms[phase][f"{ours} <- {innermost}" if ours != innermost else innermost] += ms

    def top(self, count: int = 12) -> list[dict[str, float | str]]:
        """Per phase, its total and the ``count`` places that took the most of it, in ms."""
        rows: list[dict[str, float | str]] = []
        for phase, places in self.ms.items():
            rows.append({"phase": phase, "where": "(all)", "ms": sum(places.values())})
            top = places.most_common(count)
            rows += [{"phase": phase, "where": where, "ms": ms} for where, ms in top]
        return rows
