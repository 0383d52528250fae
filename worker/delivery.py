"""How the scheduling loop talks to whatever delivered its requests: a small interface.

The loop (:mod:`worker.loop`) takes requests, admits them into the executor and steps it;
everything about where a request came from and where its outcome goes is a
:class:`Delivery`: Celery's in the worker (:mod:`worker.celery_delivery`), an in-process one
for the bench and the loop's unit tests (:mod:`worker.inprocess`).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.executor import Outcome


class Item(Protocol):
    """One delivered request: a task id and its message kwargs (a Celery ``Request`` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def kwargs(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Completion:
    """A finished delivery whose outcome is stored (or was stored by an earlier delivery)."""

    item: Any
    outcome: Outcome | None  # None: a redelivery of a task that already has a result
    runtime_s: float
    batch_size: int


class Delivery(Protocol):
    """What the loop needs from delivery; every method is called on the loop's model thread."""

    def begin(self, items: Sequence[Any], give_up: Callable[[], bool]) -> list[Any] | None:
        """Drop the revoked or expired, announce the rest as started; returns the live ones
        (None: the hand-over was given up, because ``give_up()`` turned true)."""

    def already_stored(self, items: Sequence[Any]) -> set[str]:
        """Ids that already have a final result (dedupe: a redelivery is not run again)."""

    def reached_model_before(self, items: Sequence[Any]) -> set[str]:
        """Ids an earlier delivery of which reached the model (and left no result)."""

    def count_attempts(self, items: Sequence[Any]) -> dict[str, int]:
        """Count one more attempt of each; returns the counts, across worker restarts."""

    def store(self, item: Any, outcome: Outcome) -> None:
        """Store the outcome (raises if it cannot: the loop then requeues the item)."""

    def finish(self, completions: Sequence[Completion]) -> None:
        """Send the completions' events and ack them (results are already stored)."""

    def requeue(self, item: Any) -> None:
        """Give the item back to its source unanswered, to be delivered again."""

    def drain(self) -> None:
        """Finish every completion still pending, on the caller's thread (at shutdown)."""
