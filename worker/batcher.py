"""The prefetching batch consumer: buffers Celery requests and feeds the model thread.

Thread rules (see celery's worker internals): the event-loop thread owns the broker
connection, worker state and the event dispatcher; the model thread owns the GPU.
Everything that touches the former is handed to the loop through :class:`LoopHandoff`.
Result storage runs on the model thread (the result backend is thread-local).
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import states
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from celery.worker.state import task_accepted, task_ready

from producer.errors import ModelError
from worker.executor import Executor, Outcome, StepReport
from worker.handoff import LoopHandoff
from worker.policy import decide_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A finished task whose outcome is stored (or was stored by an earlier delivery)."""

    request: Request
    outcome: Outcome | None  # None: a redelivery of a task that already has a result
    runtime_s: float
    batch_size: int


@dataclass(frozen=True)
class BatchStats:
    """What the model did since the last report, for monitoring observers (model thread).

    A report covers one batch of the batch executor, or about a second of decode steps of
    the continuous engine.
    """

    finished_at: float  # epoch seconds
    window_s: float  # wall time this report covers
    steps: int  # executor steps (batches, or decode steps) in the window
    batch_size: float  # mean requests computed together per step
    slots_in_use: int  # requests inside the model after the last step
    finished: int  # requests that ended in the window
    failed: int  # of those, how many ended in a named error
    pending: int  # requests still buffered in this worker
    queue_wait_ms: float  # mean wait in this worker's buffer of the requests admitted
    model_ms: float  # time inside executor steps
    prefill_ms: float | None  # None: the executor does not tell prefill from decode
    decode_ms: float | None
    prompt_tokens: int
    answer_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.window_s if self.window_s > 0 else 0.0


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


BatchObserver = Callable[[BatchStats], None]


class Batcher:
    """Buffers requests, hands them to the executor, stores each outcome, then acks.

    Requests leave the buffer as the executor has room: a whole batch for the batch
    executor (cut by :func:`decide_batch`), free slots for the continuous engine (at once
    while it is busy, after the batch wait while it is idle).
    """

    def __init__(
        self,
        executor: Executor,
        handoff: LoopHandoff,
        app: Any,
        *,
        max_wait_s: float,
        max_attempts: int,
        observers: Sequence[BatchObserver] = (),
        on_stored: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._handoff = handoff
        self._app = app  # app.backend is thread-local: read it on the model thread
        self._max_wait_s = max_wait_s
        self._max_attempts = max_attempts
        self._observers = list(observers)
        self._on_stored = on_stored  # e.g. the ledger's forget
        self._clock = clock
        self._pending: deque[tuple[float, Request]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._completed: deque[Completion] = deque()
        self._thread: threading.Thread | None = None
        # Model thread only: requests inside the executor, by id, with when they entered.
        self._inside: dict[str, tuple[Request, float]] = {}
        # Model thread only: further deliveries of a task inside, acked with its outcome.
        self._followers: dict[str, list[Request]] = {}
        self._window = _Window()
        self._last_rows = 0

    # -- event-loop thread ---------------------------------------------------
    def add(self, request: Request) -> None:
        with self._cond:
            self._pending.append((self._clock(), request))
            self._cond.notify()

    def drop_pending(self) -> None:
        """Forget buffered requests whose messages the broker has taken back."""
        with self._cond:
            if self._pending:
                logger.info("Dropping %d buffered requests after reconnect", len(self._pending))
            self._pending.clear()

    def _begin(self, batch: list[Request]) -> list[Request]:
        live = []
        for req in batch:
            if req.revoked():  # a revoke or `expires` that came while it was buffered
                continue
            task_accepted(req)
            req.send_event("task-started")
            live.append(req)
        return live

    def drain(self) -> None:
        """Announce and acknowledge every completion; results are already stored."""
        while self._completed:
            c = self._completed.popleft()
            try:
                self._announce(c)
            except Exception:  # an event lost (e.g. to a broker hiccup) must not skip the ack
                logger.exception("Could not send the events of task %s", c.request.id)
            c.request.acknowledge()

    @staticmethod
    def _announce(c: Completion) -> None:
        req, outcome = c.request, c.outcome
        if outcome is None:
            task_ready(req)
        elif outcome.error is None:
            task_ready(req, successful=True)
            result = outcome.result or {}
            req.send_event(
                "task-succeeded",
                result=shown_result(result),
                runtime=c.runtime_s,
                batch_size=c.batch_size,
                prompt_tokens=result.get("prompt_tokens"),
                answer_tokens=result.get("answer_tokens"),
            )
        else:
            task_ready(req)
            req.send_event(
                "task-failed",
                exception=saferepr(outcome.error),
                traceback=outcome.traceback,
                runtime=c.runtime_s,
                batch_size=c.batch_size,
            )

    # -- model thread --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlmq-model", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the batch in flight, then stop; buffered requests stay unacked."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.drain()

    def _run(self) -> None:
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
                for req, _ in self._inside.values():
                    self._handoff.call(req.reject, True)
                for followers in self._followers.values():
                    for req in followers:
                        self._handoff.call(req.reject, True)
                self._inside.clear()
                self._followers.clear()
                try:
                    self._executor.reset()
                except Exception:
                    logger.exception("Could not reset the executor")
                if taken is None:
                    return

    def _take(self) -> list[tuple[float, Request]] | None:
        """Requests to admit now ([] if none but the executor has work); None: stop."""
        with self._cond:
            while not self._stopping:
                busy = self._executor.has_work()
                room = self._executor.room()
                decision = decide_batch(
                    len(self._pending) if room else 0,
                    self._pending[0][0] if self._pending else None,
                    self._clock(),
                    max_batch_size=max(room, 1),
                    max_wait_s=0.0 if busy else self._max_wait_s,
                )
                if decision.take:
                    return [self._pending.popleft() for _ in range(decision.take)]
                if busy:
                    return []
                self._cond.wait(decision.wait_s)
            return None

    def _admit(self, taken: list[tuple[float, Request]]) -> None:
        ok, live = self._handoff.call_and_wait(
            self._begin, [req for _, req in taken], give_up=lambda: self._stopping
        )
        if not ok or not live:
            return
        arrivals = {req.id: arrived for arrived, req in taken}
        done_before = self._already_stored(live)
        for req in live:
            if req.id in done_before:
                logger.info("Task %s already has a result; acking its redelivery", req.id)
                self._completed.append(Completion(req, None, 0.0, 0))
        if done_before:
            self._handoff.call(self.drain)
        to_run = [req for req in live if req.id not in done_before]
        # Another delivery of a task that is inside the executor (its message came back while
        # it ran, e.g. restored on a reconnect): it is acked with the first one's outcome.
        unique: dict[str, Request] = {}
        for req in to_run:
            if req.id in self._inside or req.id in unique:
                logger.info("Task %s is already running here; its redelivery waits for it", req.id)
                self._followers.setdefault(req.id, []).append(req)
            else:
                unique[req.id] = req
        to_run = list(unique.values())
        # A request whose earlier delivery reached the model and left no result may have
        # killed the worker: it runs alone, so it cannot use up its batch-mates' attempts.
        suspect = self._reached_model_before(to_run)
        for req in to_run:
            if req.id in suspect:
                self._finish_all()
                self._enter([req], arrivals)
                self._finish_all()
        fresh = [req for req in to_run if req.id not in suspect]
        if fresh:
            self._enter(fresh, arrivals)

    def _enter(self, group: list[Request], arrivals: dict[str, float]) -> None:
        """Count the attempt, then hand the requests to the executor."""
        attempts = self._count_attempts(group)
        now = self._clock()
        for req in group:
            self._inside[req.id] = (req, now)
            self._window.admitted += 1
            self._window.wait_s += now - arrivals[req.id]
        runnable = [req for req in group if attempts[req.id] <= self._max_attempts]
        given_up = [
            self._gave_up(req, attempts[req.id])
            for req in group
            if attempts[req.id] > self._max_attempts
        ]
        self._complete(given_up + self._executor.admit([(r.id, r.kwargs) for r in runnable]))

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
        """Store each outcome, then hand the announcements and acks to the loop, then tell
        ``on_stored`` which tasks are done."""
        if not outcomes:
            return
        now = self._clock()
        stored = []
        for outcome in outcomes:
            if outcome.task_id not in self._inside:
                # Requeued when an earlier step failed outside the model (e.g. Redis went
                # away): its message is back with the broker, so this late outcome is dropped.
                logger.warning("Dropping the late outcome of requeued task %s", outcome.task_id)
                continue
            req, entered = self._inside.pop(outcome.task_id)
            followers = self._followers.pop(outcome.task_id, [])
            self._window.add_outcome(outcome)
            try:
                self._store(req, outcome)
            except Exception:
                logger.exception("Could not store the result of %s; requeueing it", req.id)
                for delivery in (req, *followers):
                    self._handoff.call(delivery.reject, True)
                continue
            stored.append(req.id)
            self._completed.append(Completion(req, outcome, now - entered, rows))
            self._completed.extend(Completion(f, None, 0.0, 0) for f in followers)
        self._handoff.call(self.drain)
        if stored and self._on_stored is not None:
            try:
                self._on_stored(stored)
            except Exception as exc:  # the sweeper drops entries with a result by itself
                logger.warning("Could not drop %d done tasks from the ledger: %r", len(stored), exc)

    def _reached_model_before(self, requests: list[Request]) -> set[str]:
        """Ids whose attempt counter is already set: an earlier delivery reached the model."""
        if not requests:
            return set()
        found = self._app.backend.mget([f"vlmq:attempts:{req.id}" for req in requests])
        if isinstance(found, dict):  # the cache backend answers with a mapping
            found = [found.get(f"vlmq:attempts:{req.id}") for req in requests]
        return {req.id for req, raw in zip(requests, found, strict=True) if raw}

    def _count_attempts(self, requests: list[Request]) -> dict[str, int]:
        """Count deliveries that reached the model, across worker crashes and restarts."""
        backend = self._app.backend
        counts = {}
        for req in requests:
            key = f"vlmq:attempts:{req.id}"
            try:
                counts[req.id] = int(backend.incr(key))
            except KeyError:  # the cache backend (in-memory demo) cannot incr a missing key
                backend.set(key, 1)
                counts[req.id] = 1
            backend.expire(key, 7 * 24 * 3600)
        return counts

    def _gave_up(self, req: Request, attempts: int) -> Outcome:
        error = ModelError(
            f"gave up after {attempts - 1} attempts: every earlier run of this task ended "
            "without a result (the worker died or was stopped while running it)"
        )
        return Outcome(task_id=req.id, error=error, traceback=None)

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

    def _already_stored(self, requests: list[Request]) -> set[str]:
        """Ids that already have a final result: a redelivered task is not run again."""
        backend = self._app.backend
        keys = [backend.get_key_for_task(req.id) for req in requests]
        found = backend.mget(keys)
        if isinstance(found, dict):  # the cache backend answers with a mapping
            found = [found.get(key) for key in keys]
        done = set()
        for req, raw in zip(requests, found, strict=True):
            if raw and backend.decode_result(raw).get("status") in states.READY_STATES:
                done.add(req.id)
        return done

    def _store(self, req: Request, outcome: Outcome) -> None:
        backend = self._app.backend
        if outcome.error is None:
            backend.mark_as_done(req.id, outcome.result, request=req._context)
        else:
            backend.mark_as_failure(
                req.id, outcome.error, traceback=outcome.traceback, request=req._context
            )


#: The texts of a result, shown after its figures in the ``task-succeeded`` event.
_TEXT_FIELDS = ("answer", "stages")


def shown_result(result: dict[str, Any], maxlen: int = 1024) -> str:
    """The result as a ``task-succeeded`` event carries it (Flower's task page shows it):
    token counts, timings and batch size first, so a long answer cut at ``maxlen`` never
    hides them."""
    ordered = {k: v for k, v in result.items() if k not in _TEXT_FIELDS}
    ordered.update({k: result[k] for k in _TEXT_FIELDS if k in result})
    return saferepr(ordered, maxlen=maxlen)
