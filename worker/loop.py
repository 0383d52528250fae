"""The scheduling loop: buffer requests, take them as the executor has room, admit, step.

It knows nothing of Celery: where requests come from and where outcomes go is a
:class:`~worker.delivery.Delivery`. The loop runs on its own model thread in the worker
(:meth:`BatchLoop.start`) or on the caller's thread in the bench (:meth:`BatchLoop.run`).
"""

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.errors import ModelError
from producer.events import BatchStats
from worker.delivery import Completion, Delivery
from worker.executor import Executor, Outcome, StepReport
from worker.policy import decide_batch

logger = logging.getLogger(__name__)

BatchObserver = Callable[[BatchStats], None]


@dataclass
class _Window:
    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    rows: int = 0
    finished: int = 0
    failed: int = 0
    admitted: int = 0
    wait_s: float = 0.0
    model_ms: float = 0.0
    prefill_ms: float | None = None
    decode_ms: float | None = None
    prompt_tokens: int = 0
    answer_tokens: int = 0

    def add_step(self, report: StepReport) -> None:
        self.steps += 1
        self.rows += report.rows
        self.model_ms += report.model_ms
        if report.prefill_ms is not None:
            self.prefill_ms = (self.prefill_ms or 0.0) + report.prefill_ms
        if report.decode_ms is not None:
            self.decode_ms = (self.decode_ms or 0.0) + report.decode_ms

    def add_outcome(self, outcome: Outcome) -> None:
        self.finished += 1
        if outcome.result is None:
            self.failed += 1
        else:
            self.prompt_tokens += outcome.result["prompt_tokens"]
            self.answer_tokens += outcome.result["answer_tokens"]


class BatchLoop:
    """Buffers requests, hands them to the executor, stores each outcome, then finishes it.

    Requests leave the buffer as the executor has room: a whole batch for the batch
    executor (cut by :func:`decide_batch`), free slots for the continuous engine (at once
    while it is busy, after the batch wait while it is idle).
    """

    def __init__(
        self,
        executor: Executor,
        delivery: Delivery,
        *,
        max_wait_s: float,
        max_attempts: int,
        observers: Sequence[BatchObserver] = (),
        on_stored: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._delivery = delivery
        self._max_wait_s = max_wait_s
        self._max_attempts = max_attempts
        self._observers = list(observers)
        self._on_stored = on_stored  # e.g. the ledger's forget
        self._clock = clock
        self._pending: deque[tuple[float, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Model thread only: items inside the executor, by id, with when they entered.
        self._inside: dict[str, tuple[Any, float]] = {}
        # Model thread only: further deliveries of a task inside, finished with its outcome.
        self._followers: dict[str, list[Any]] = {}
        self._window = _Window()
        self._last_rows = 0

    # -- any thread ----------------------------------------------------------
    def add(self, item: Any) -> None:
        """Buffer one delivered request."""
        with self._cond:
            self._pending.append((self._clock(), item))
            self._cond.notify()

    def drop_pending(self) -> None:
        """Forget buffered requests whose messages the broker has taken back."""
        with self._cond:
            if self._pending:
                logger.info("Dropping %d buffered requests after reconnect", len(self._pending))
            self._pending.clear()

    def close(self) -> None:
        """No more requests will come: serve the buffer without waiting, then end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def start(self) -> None:
        """Run the loop on a new model thread."""
        self._thread = threading.Thread(target=self.run, name="vlmq-model", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish what is inside the executor, then stop; buffered requests stay unfinished."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._delivery.drain()

    # -- model thread --------------------------------------------------------
    def run(self) -> None:
        """Take, admit and step until stopped (or closed and out of work)."""
        while True:
            taken = self._take()
            try:
                if taken is None:
                    # Stopping: finish what is inside the executor, so a warm shutdown wastes
                    # no generation and uses up no attempt; the buffer stays unacked.
                    self._finish_all()
                    return
                if taken:
                    self._admit(taken)
                if self._executor.has_work():
                    self._step()
            except Exception:
                # Never let the model thread die. What is inside the executor has no result:
                # back to the queue (attempts are counted, so a poison cannot loop forever).
                logger.exception("The model step failed; requeueing %d tasks", len(self._inside))
                for item, _ in self._inside.values():
                    self._delivery.requeue(item)
                for followers in self._followers.values():
                    for item in followers:
                        self._delivery.requeue(item)
                self._inside.clear()
                self._followers.clear()
                try:
                    self._executor.reset()
                except Exception:
                    logger.exception("Could not reset the executor")
                if taken is None:
                    return

    def _take(self) -> list[tuple[float, Any]] | None:
        """Requests to admit now ([] if none but the executor has work); None: stop."""
        with self._cond:
            while not self._stopping:
                busy = self._executor.has_work()
                if self._closed and not busy and not self._pending:
                    return None
                room = self._executor.room()
                decision = decide_batch(
                    len(self._pending) if room else 0,
                    self._pending[0][0] if self._pending else None,
                    self._clock(),
                    max_batch_size=max(room, 1),
                    max_wait_s=0.0 if busy or self._closed else self._max_wait_s,
                )
                if decision.take:
                    return [self._pending.popleft() for _ in range(decision.take)]
                if busy:
                    return []
                wait_s = decision.wait_s  # inf: static batches, woken by add or close
                self._cond.wait(None if wait_s is None or math.isinf(wait_s) else wait_s)
            return None

    def _admit(self, taken: list[tuple[float, Any]]) -> None:
        live = self._delivery.begin([item for _, item in taken], lambda: self._stopping)
        if not live:
            return
        arrivals = {item.id: arrived for arrived, item in taken}
        done_before = self._delivery.already_stored(live)
        redelivered = [item for item in live if item.id in done_before]
        for item in redelivered:
            logger.info("Task %s already has a result; finishing its redelivery", item.id)
        if redelivered:
            self._delivery.finish([Completion(item, None, 0.0, 0) for item in redelivered])
        # Another delivery of a task that is inside the executor (its message came back while
        # it ran, e.g. restored on a reconnect): it is finished with the first one's outcome.
        unique: dict[str, Any] = {}
        for item in live:
            if item.id in done_before:
                continue
            if item.id in self._inside or item.id in unique:
                logger.info("Task %s is already running here; its redelivery waits", item.id)
                self._followers.setdefault(item.id, []).append(item)
            else:
                unique[item.id] = item
        to_run = list(unique.values())
        # A request whose earlier delivery reached the model and left no result may have
        # killed the worker: it runs alone, so it cannot use up its batch-mates' attempts.
        suspect = self._delivery.reached_model_before(to_run)
        for item in to_run:
            if item.id in suspect:
                self._finish_all()
                self._enter([item], arrivals)
                self._finish_all()
        fresh = [item for item in to_run if item.id not in suspect]
        if fresh:
            self._enter(fresh, arrivals)

    def _enter(self, group: list[Any], arrivals: dict[str, float]) -> None:
        """Count the attempt, then hand the requests to the executor."""
        attempts = self._delivery.count_attempts(group)
        now = self._clock()
        for item in group:
            self._inside[item.id] = (item, now)
            self._window.admitted += 1
            self._window.wait_s += now - arrivals[item.id]
        runnable = [item for item in group if attempts[item.id] <= self._max_attempts]
        given_up = [
            _gave_up(item.id, attempts[item.id])
            for item in group
            if attempts[item.id] > self._max_attempts
        ]
        admitted = self._executor.admit([(item.id, item.kwargs) for item in runnable])
        self._complete(given_up + admitted)

    def _finish_all(self) -> None:
        while self._executor.has_work():
            self._step()

    def _step(self) -> None:
        report = self._executor.step()
        self._last_rows = report.rows
        self._window.add_step(report)
        self._complete(report.outcomes, rows=report.rows)
        if not self._executor.has_work() or time.monotonic() - self._window.started >= 1.0:
            self._observe()

    def _complete(self, outcomes: list[Outcome], rows: int = 0) -> None:
        """Store each outcome, then hand the completions to delivery, then tell
        ``on_stored`` which tasks are done."""
        if not outcomes:
            return
        now = self._clock()
        stored, completions = [], []
        for outcome in outcomes:
            if outcome.task_id not in self._inside:
                # Requeued when an earlier step failed outside the model (e.g. Redis went
                # away): its message is back with the broker, so this late outcome is dropped.
                logger.warning("Dropping the late outcome of requeued task %s", outcome.task_id)
                continue
            item, entered = self._inside.pop(outcome.task_id)
            followers = self._followers.pop(outcome.task_id, [])
            self._window.add_outcome(outcome)
            try:
                self._delivery.store(item, outcome)
            except Exception:
                logger.exception("Could not store the result of %s; requeueing it", item.id)
                for delivery in (item, *followers):
                    self._delivery.requeue(delivery)
                continue
            stored.append(item.id)
            completions.append(Completion(item, outcome, now - entered, rows))
            completions.extend(Completion(f, None, 0.0, 0) for f in followers)
        self._delivery.finish(completions)
        if stored and self._on_stored is not None:
            try:
                self._on_stored(stored)
            except Exception as exc:  # the sweeper drops entries with a result by itself
                logger.warning("Could not drop %d done tasks from the ledger: %r", len(stored), exc)

    def _observe(self) -> None:
        window, self._window = self._window, _Window()
        if not self._observers or not window.steps:
            return
        stats = BatchStats(
            finished_at=time.time(),
            window_s=time.monotonic() - window.started,
            steps=window.steps,
            batch_size=window.rows / window.steps,
            slots_in_use=self._last_rows,
            finished=window.finished,
            failed=window.failed,
            pending=len(self._pending),
            queue_wait_ms=1000.0 * window.wait_s / window.admitted if window.admitted else 0.0,
            model_ms=window.model_ms,
            prefill_ms=window.prefill_ms,
            decode_ms=window.decode_ms,
            prompt_tokens=window.prompt_tokens,
            answer_tokens=window.answer_tokens,
        )
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # monitoring must never break the work
                logger.exception("Batch observer %r failed", observer)


def _gave_up(task_id: str, attempts: int) -> Outcome:
    error = ModelError(
        f"gave up after {attempts - 1} attempts: every earlier run of this task ended "
        "without a result (the worker died or was stopped while running it)"
    )
    return Outcome(task_id=task_id, error=error, traceback=None)
