"""Run callables on the worker's event-loop thread from the model thread."""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _logged(fn: Callable[..., Any], *args: Any) -> None:
    # An exception escaping a callback would end the hub's round of ready callbacks and drop
    # the rest of them (one may be a call the model thread waits for). What fails here is an
    # ack, a reject or an event on a lost connection: its message stays unacked in Redis and
    # comes back after the visibility timeout.
    try:
        fn(*args)
    except Exception:
        logger.exception("%s failed on the event loop", getattr(fn, "__qualname__", fn))


class LoopHandoff:
    """Hands work to the thread that owns Celery's connection, state and events.

    With an event-loop transport (Redis, AMQP) kombu's ``Hub.call_soon`` is the one
    thread-safe entry into the loop. Without a hub (the in-memory transport of the
    demo's fallback) the callable runs in the calling thread under a lock.
    """

    def __init__(self, hub: Any | None) -> None:
        self._hub = hub
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; do not wait. What it raises is logged."""
        if self._hub is not None:
            self._hub.call_soon(_logged, fn, *args)
            return
        with self._lock:
            _logged(fn, *args)

    def call_and_wait(
        self, fn: Callable[..., T], *args: Any, give_up: Callable[[], bool]
    ) -> tuple[bool, T | None]:
        """Run ``fn(*args)`` on the loop and wait for its value.

        Returns ``(True, value)``, or ``(False, None)`` once ``give_up()`` is true while
        the loop has not run it — the loop stops before the worker's own steps do.
        """
        if self._hub is None:
            with self._lock:
                return True, fn(*args)
        future: Future[T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self._hub.call_soon(run)
        while True:
            try:
                return True, future.result(timeout=0.5)
            except FutureTimeout:
                if give_up() and future.cancel():
                    return False, None
