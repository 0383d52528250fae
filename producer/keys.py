"""Every Redis key vlmq reads or writes, in one place (the broker's Redis holds them all)."""

IMAGE_PREFIX = "vlmq:image:"
"""Claim-check entries: ``vlmq:image:<sha256 hex>`` -> image bytes, with a TTL."""

LEDGER_ENTRIES = "vlmq:ledger"
"""Hash: task id -> JSON ledger entry of an accepted task (:mod:`producer.ledger`)."""

LEDGER_SEEN = "vlmq:ledger:seen"
"""Sorted set: task id -> epoch seconds when the task was last known alive."""

LEDGER_RESENT = "vlmq:ledger:resent"
"""Counter: tasks the sweepers have sent again, all workers together."""

SWEEPER_LOCK = "vlmq:sweeper:lock"
"""The lock that picks the one worker whose sweeper runs a sweep."""

DEAD_LETTERS = "vlmq.dead"
"""List, newest first: broker entries no worker could decode or run (:mod:`producer.deadletter`)."""

RESULT_PREFIX = "celery-task-meta-"
"""Where Celery's Redis result backend stores a task's result (Celery's own name)."""

ATTEMPTS_TTL_S = 7 * 24 * 3600
"""How long a task's attempt counter lives."""


def attempts_key(task_id: str) -> str:
    """Counter: deliveries of ``task_id`` that reached the model, across worker restarts."""
    return f"vlmq:attempts:{task_id}"


def result_key(task_id: str) -> str:
    """The stored result of ``task_id``."""
    return RESULT_PREFIX + task_id
