"""Python's cyclic garbage collector, kept out of the engine's way and timed.

A full collection walks every object the collector tracks. Torch, transformers and Celery
alone create ~380k of them, so each full collection holds the GIL for ~130 ms: the
engine thread cannot launch a decode step meanwhile, and every running answer stalls.
:func:`freeze_resident` moves what exists once the worker is ready (libraries, the model, the
engine) out of the collector's sight; later collections walk only what came after.
:class:`CollectorClock` times every collection, so a stall can be put down to it.
"""

from __future__ import annotations

import gc
import time
from typing import Any


def freeze_resident() -> None:
    """Collect once, then freeze everything alive: it is resident for the process's life.

    Objects frozen are never collected; a caller that frees frozen objects (the bench, between
    models) calls ``gc.unfreeze()`` first.
    """
    gc.collect()
    gc.freeze()


class CollectorClock:
    """Time spent in the garbage collector since the clock was installed, in milliseconds."""

    def __init__(self) -> None:
        self.total_ms = 0.0
        self.collections = 0
        self.longest_ms = 0.0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs in whichever thread triggered the collection, with the GIL held: never raises.
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            ms = (time.perf_counter() - self._started) * 1000.0
            self._started = None
            self.total_ms += ms
            self.collections += 1
            self.longest_ms = max(self.longest_ms, ms)


#: The process's clock: in ``gc.callbacks`` from this module's import on.
CLOCK = CollectorClock()
gc.callbacks.append(CLOCK._callback)
