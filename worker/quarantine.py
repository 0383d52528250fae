"""Quarantine of poison broker entries: record them as dead letters, tell the producer, count.

Whatever the layer that finds an entry unusable — the transport (not a kombu message at all),
the consumer (unknown task, undecodable body) or the strategy (wrong body or headers) — it hands
the entry here instead of raising, and then takes it off the queue. A worker never stops
because of a message.
"""

import json
import logging
import threading
from typing import Any

from producer.deadletter import DeadLetter, DeadLetters
from producer.errors import InvalidRequest
from producer.protocol import TASK_NAME

logger = logging.getLogger(__name__)

_MAX_TASK_ID_CHARS = 255


def readable_task_id(headers: Any) -> str | None:
    """The task id of a message's headers, if it is one a result can be stored under."""
    if not isinstance(headers, dict):
        return None
    task_id = headers.get("id")
    if (
        isinstance(task_id, str)
        and 0 < len(task_id) <= _MAX_TASK_ID_CHARS
        and task_id.isprintable()
    ):
        return task_id
    return None


_TEXT = (str, type(None))
# The headers Celery reads from a task message, and the types it can use.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "shadow": _TEXT,
    "root_id": _TEXT,
    "parent_id": _TEXT,
    "group": _TEXT,
    "group_index": (int, type(None)),
    "eta": _TEXT,
    "expires": _TEXT,
    "retries": (int,),
    "timelimit": (list, type(None)),
    "argsrepr": _TEXT,
    "kwargsrepr": _TEXT,
    "ignore_result": (bool, type(None)),
    "replaced_task_nesting": (int, type(None)),
    "origin": _TEXT,
    "lang": _TEXT,
}
_PROPERTY_TYPES: dict[str, tuple[type, ...]] = {
    "correlation_id": _TEXT,
    "reply_to": _TEXT,
    "priority": (int, type(None)),
}
# Canvas links (callbacks, chains, chords) would run other tasks on this worker's results.
_EMBED_UNSUPPORTED = ("callbacks", "errbacks", "chain", "chord")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def task_message_problem(message: Any) -> str | None:
    """What keeps ``message`` from being a ``vlmq.analyze`` task message (Celery protocol 2,
    JSON body ``[[], kwargs, embed]``), or None. The kwargs themselves are checked later, per
    task, with a named error (:meth:`producer.protocol.AnalysisRequest.from_message`).

    Decodes the body: raises kombu's ``ContentDisallowed`` or ``DecodeError`` for a body that
    is not JSON.
    """
    headers = message.headers
    if not isinstance(headers, dict) or headers.get("task") != TASK_NAME:
        return f"headers do not name the task {TASK_NAME} (only Celery protocol 2 is accepted)"
    if readable_task_id(headers) is None:
        return "headers carry no usable task id (a non-empty printable string)"
    for name, types in _HEADER_TYPES.items():
        value = headers.get(name)
        if name in headers and not _has_type(value, types):
            return f"header {name!r} has the wrong type ({type(value).__name__})"
    if headers.get("ignore_result"):
        return f"{TASK_NAME} always stores its result: ignore_result is not accepted"
    if headers.get("stamps") or headers.get("stamped_headers"):
        return f"{TASK_NAME} takes no stamps"  # Celery would copy them into the result
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        len(timelimit) == 2 and all(map(_is_number_or_none, timelimit))
    ):
        return "header 'timelimit' is not [soft, hard] seconds"
    properties = message.properties
    if not isinstance(properties, dict):
        return "properties is not an object"
    for name, types in _PROPERTY_TYPES.items():
        value = properties.get(name)
        if not _has_type(value, types):
            return f"property {name!r} has the wrong type ({type(value).__name__})"
    body = message.payload
    if not (isinstance(body, list) and len(body) == 3):
        return f"the body is not Celery's [args, kwargs, embed] but JSON {type(body).__name__}"
    args, kwargs, embed = body
    if args != []:
        return f"{TASK_NAME} takes no positional arguments, got {type(args).__name__}"
    if not isinstance(kwargs, dict):
        return f"the task kwargs are JSON {type(kwargs).__name__}, not an object"
    if not isinstance(embed, (dict, type(None))):
        return f"the body's third part is JSON {type(embed).__name__}, not an object"
    linked = [key for key in _EMBED_UNSUPPORTED if (embed or {}).get(key) is not None]
    if linked:
        return f"{TASK_NAME} takes no canvas links, got {', '.join(linked)}"
    return None


def message_bytes(message: Any) -> bytes:
    """The queue entry a kombu virtual-transport message (Redis, memory) was made from."""
    return json.dumps(message._raw).encode()


class Quarantine:
    """Records poison entries in :class:`~producer.deadletter.DeadLetters` (``vlmq.dead``) and,
    where the entry names a task id without a result yet, stores ``InvalidRequest`` for it.

    ``app`` gives the result backend (thread-local: read where the entry is handled).
    """

    def __init__(self, dead_letters: DeadLetters, app: Any) -> None:
        self._dead_letters = dead_letters
        self._app = app
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        """Entries this worker dead-lettered since it started."""
        with self._lock:
            return self._count

    def entry(self, raw: bytes, queue: str, reason: str, task_id: str | None = None) -> bool:
        """Quarantine one raw entry taken from ``queue``; False if it could not be recorded
        (Redis unreachable): then the caller must leave the message with the broker."""
        letter = DeadLetter.of(raw, reason, queue, task_id)
        try:
            self._dead_letters.add(letter)
        except Exception as exc:
            logger.error(
                "Could not dead-letter an entry of %s (%s: %s): %r; entry: %s",
                queue, reason, type(exc).__name__, exc, letter.preview(),
            )  # fmt: skip
            return False
        with self._lock:
            self._count += 1
        logger.warning(
            "Dead-lettered an entry of %s%s (%d bytes) to vlmq.dead as %s: %s",
            queue, f" (task {task_id})" if task_id else "", len(raw), letter.id, reason,
        )  # fmt: skip
        if task_id is not None:
            self._fail_task(task_id, reason)
        return True

    def message(self, message: Any, reason: str) -> bool:
        """Quarantine a kombu message (the entry it was made from); see :meth:`entry`."""
        delivery_info = getattr(message, "delivery_info", None) or {}
        queue = delivery_info.get("routing_key") if isinstance(delivery_info, dict) else None
        return self.entry(
            message_bytes(message),
            queue if isinstance(queue, str) else "?",
            reason,
            readable_task_id(getattr(message, "headers", None)),
        )

    def _fail_task(self, task_id: str, reason: str) -> None:
        # Celery's backend keeps a SUCCESS already stored under this id (its _store_result).
        error = InvalidRequest(f"the message was malformed and was dead-lettered: {reason}")
        try:
            self._app.backend.mark_as_failure(task_id, error, request=None)
        except Exception as exc:
            logger.error("Could not store the failure of dead-lettered task %s: %r", task_id, exc)
