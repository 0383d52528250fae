"""The worker's Celery consumer: every message it cannot run is quarantined, none is fatal.

Celery's own consumer logs and drops (rejects or acks) a message with no task name, an unknown
task name, an invalid body or an undecodable one, and lets anything else a message makes it
raise end the worker (a task name that is a list: ``TypeError: unhashable type``). Here all
of them go to :class:`~worker.quarantine.Quarantine`: dead-lettered in ``vlmq.dead``, a named
error stored where the task id is readable, then acked.
"""

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from producer.protocol import TASK_NAME
from worker.quarantine import Quarantine

logger = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    """Celery's consumer with poison messages quarantined."""

    @property
    def quarantine(self) -> Quarantine:
        return self.app.vlmq.quarantine

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        connection_errors = self.connection_errors

        def on_task_received(message: Any) -> None:
            try:
                handle(message)
            except connection_errors:
                raise  # the broker went away: Celery reconnects
            except Exception as exc:
                self._quarantine(message, f"unusable message: {type(exc).__name__}: {exc}")

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._quarantine(message, "not a task message: its headers name no task")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        self._quarantine(message, f"unknown task {name!r}: this worker runs only {TASK_NAME}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._quarantine(message, f"invalid task message: {exc}")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._quarantine(
            message, f"undecodable body (content type {message.content_type!r}): {exc}"
        )

    def _quarantine(self, message: Any, reason: str) -> None:
        if self.quarantine.message(message, reason) and not message.acknowledged:
            message.ack_log_error(logger, self.connection_errors)
        # else: not recorded (Redis unreachable); left unacked, it comes back after the
        # visibility timeout or when the connection is restored.
