"""In-process delivery: the worker's loop without a broker (the bench, the loop's tests).

Requests are :class:`Job` objects added to the loop; outcomes are kept in memory and handed
to an ``on_finish`` callback on the loop's thread.
"""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.delivery import Completion
from worker.executor import Executor, Outcome
from worker.loop import BatchLoop, BatchObserver

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request delivered in process: a task id, its message kwargs, and when it was
    started (entered the executor, epoch seconds)."""

    id: str
    kwargs: Mapping[str, Any]
    started_at: float | None = None


@dataclass
class InProcessDelivery:
    """:class:`worker.delivery.Delivery` in memory: results and attempts in dicts.

    ``revoked`` ids are dropped at :meth:`begin`; a requeued job is kept in ``requeued``
    (nothing delivers it again).
    """

    on_finish: Callable[[Sequence[Completion]], None] | None = None
    revoked: set[str] = field(default_factory=set)
    results: dict[str, Outcome] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    requeued: list[Job] = field(default_factory=list)

    def begin(self, items: Sequence[Job], give_up: Callable[[], bool]) -> list[Job]:
        now = time.time()
        live = [job for job in items if job.id not in self.revoked]
        for job in live:
            job.started_at = now
        return live

    def already_stored(self, items: Sequence[Job]) -> set[str]:
        return {job.id for job in items if job.id in self.results}

    def reached_model_before(self, items: Sequence[Job]) -> set[str]:
        return {job.id for job in items if self.attempts.get(job.id)}

    def count_attempts(self, items: Sequence[Job]) -> dict[str, int]:
        for job in items:
            self.attempts[job.id] = self.attempts.get(job.id, 0) + 1
        return {job.id: self.attempts[job.id] for job in items}

    def store(self, item: Job, outcome: Outcome) -> None:
        self.results[item.id] = outcome

    def finish(self, completions: Sequence[Completion]) -> None:
        if completions and self.on_finish is not None:
            self.on_finish(completions)

    def requeue(self, item: Job) -> None:
        logger.warning("Job %s requeued in process: it will not run again", item.id)
        self.requeued.append(item)

    def drain(self) -> None:
        """Nothing waits: :meth:`finish` hands completions over at once."""


def in_process_loop(
    executor: Executor,
    *,
    max_wait_s: float,
    max_attempts: int = 1,
    on_finish: Callable[[Sequence[Completion]], None] | None = None,
    observers: Sequence[BatchObserver] = (),
) -> tuple[BatchLoop, InProcessDelivery]:
    """The worker's :class:`BatchLoop` over ``executor`` with an :class:`InProcessDelivery`.

    ``add`` jobs, then ``close`` and ``run`` it (or ``start`` it on its own thread);
    ``max_wait_s=math.inf`` cuts full batches only until closed.
    """
    delivery = InProcessDelivery(on_finish=on_finish)
    loop = BatchLoop(
        executor,
        delivery,
        max_wait_s=max_wait_s,
        max_attempts=max_attempts,
        observers=observers,
        clock=time.time,
    )
    return loop, delivery
