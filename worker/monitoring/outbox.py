"""Send worker events from any thread without blocking it: queue them for the event loop."""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from worker.handoff import LoopHandoff

logger = logging.getLogger(__name__)

REASK_S = 10.0


class EventOutbox:
    """A bounded queue of ``worker-*`` events, sent on Celery's event-loop thread.

    ``put`` never blocks and never raises: it appends (dropping the oldest event when the
    loop has fallen behind) and asks the loop, once at a time, to send them all.
    Only the loop thread may use the consumer's event dispatcher.
    """

    def __init__(self, maxlen: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self._events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._clock = clock
        self._flush_asked_at: float | None = None
        self._handoff: LoopHandoff | None = None
        self._dispatcher: Callable[[], Any] = lambda: None
        self._send_failed = False

    def attach(self, handoff: LoopHandoff, dispatcher: Callable[[], Any]) -> None:
        """Start sending through ``dispatcher()`` (read on the loop: it changes on reconnect)."""
        with self._lock:
            self._handoff = handoff
            self._dispatcher = dispatcher

    def detach(self) -> None:
        """Stop sending; events put from now on are dropped."""
        with self._lock:
            self._handoff = None
            self._events.clear()

    def put(self, event_type: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if self._handoff is None:
                return
            self._events.append((event_type, fields))
            now = self._clock()
            # Ask again after a while: a flush lost with a dropped loop must not stop events.
            if self._flush_asked_at is not None and now - self._flush_asked_at < REASK_S:
                return
            self._flush_asked_at = now
            handoff = self._handoff
        try:
            handoff.call(self.flush)
        except Exception:
            logger.exception("Could not hand worker events to the event loop")
            with self._lock:
                self._flush_asked_at = None

    def flush(self) -> None:
        """Send every queued event (loop thread); a failed send is logged and dropped."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            self._flush_asked_at = None
        dispatcher = self._dispatcher()
        if dispatcher is None or not dispatcher.enabled:
            return
        for event_type, fields in events:
            try:
                dispatcher.send(event_type, **fields)
            except Exception as exc:
                if not self._send_failed:  # once per outage, not once per event
                    logger.warning("Could not send %s events: %r", event_type, exc)
                self._send_failed = True
            else:
                self._send_failed = False
