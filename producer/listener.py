"""Receive the workers' events from the broker in a background thread."""

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]


class EventListener:
    """Calls ``handler(event)`` for every ``worker-*`` event, in its own thread.

    Binds to ``worker.#`` only: task events, the bulk of the traffic, are not fetched. On
    start it asks the workers for a heartbeat, so they show up at once.
    """

    def __init__(self, app: Any, handler: Handler) -> None:
        self._app = app
        self._handler = handler
        self._receiver: Any = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vlmq-events", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "EventListener":
        """Start, and wait until bound to the event exchange (or failed)."""
        self._thread.start()
        self._ready.wait(timeout_s)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout_s)

    def _run(self) -> None:
        ready = self._ready

        class Receiver(self._app.events.Receiver):
            def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
                super().on_consume_ready(*args, **kwargs)
                ready.set()

        try:
            with self._app.connection_for_read() as conn:
                self._receiver = Receiver(
                    conn, handlers={"*": self._handler}, routing_key="worker.#"
                )
                self._receiver.capture(limit=None, timeout=None, wakeup=True)
        except Exception as exc:
            self.error = exc
            logger.debug("Event listener stopped", exc_info=True)
        finally:
            ready.set()


class Recorder:
    """Appends every event it is given to a JSON-lines file (for ``vlmq report``)."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(event, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
