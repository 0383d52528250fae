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
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from celery.worker.state import task_accepted, task_ready

from producer.errors import ModelError
from worker.executor import BatchExecutor, Outcome
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
    """What one batch did, for monitoring observers (called on the model thread)."""

    finished_at: float  # epoch seconds
    batch_size: int  # requests that reached the model
    failed: int  # of those, how many ended in a named error
    pending: int  # requests still buffered in this worker
    queue_wait_ms: float  # mean time the batch's requests waited in this worker's buffer
    model_ms: float  # validation, image loading and generation
    prompt_tokens: int
    answer_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / (self.model_ms / 1000.0) if self.model_ms > 0 else 0.0


BatchObserver = Callable[[BatchStats], None]


class Batcher:
    """Buffers requests, cuts batches by the policy, runs them, stores, then acks."""

    def __init__(
        self,
        executor: BatchExecutor,
        handoff: LoopHandoff,
        app: Any,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_attempts: int,
        observers: Sequence[BatchObserver] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._handoff = handoff
        self._app = app  # app.backend is thread-local: read it on the model thread
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_attempts = max_attempts
        self._observers = list(observers)
        self._clock = clock
        self._pending: deque[tuple[float, Request]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._completed: deque[Completion] = deque()
        self._thread: threading.Thread | None = None

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
            req, outcome = c.request, c.outcome
            if outcome is None:
                task_ready(req)
            elif outcome.error is None:
                task_ready(req, successful=True)
                result = outcome.result or {}
                req.send_event(
                    "task-succeeded",
                    result=saferepr(result, maxlen=1024),
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
            req.acknowledge()

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
        while (batch := self._next_batch()) is not None:
            try:
                self._process(batch)
            except Exception:
                # Never let the model thread die: requests not completed stay unacked
                # and come back from the broker.
                logger.exception("Batch of %d failed outside the model", len(batch))

    def _next_batch(self) -> list[tuple[float, Request]] | None:
        with self._cond:
            while not self._stopping:
                oldest = self._pending[0][0] if self._pending else None
                decision = decide_batch(
                    len(self._pending),
                    oldest,
                    self._clock(),
                    max_batch_size=self._max_batch_size,
                    max_wait_s=self._max_wait_s,
                )
                if decision.take:
                    return [self._pending.popleft() for _ in range(decision.take)]
                self._cond.wait(decision.wait_s)
            return None

    def _process(self, batch: list[tuple[float, Request]]) -> None:
        arrivals = {req.id: arrived for arrived, req in batch}
        ok, live = self._handoff.call_and_wait(
            self._begin, [req for _, req in batch], give_up=lambda: self._stopping
        )
        if not ok or not live:
            return
        started = self._clock()
        done_before = self._already_stored(live)
        to_run = []
        for req in live:
            if req.id in done_before:
                logger.info("Task %s already has a result; acking its redelivery", req.id)
                self._completed.append(Completion(req, None, 0.0, 0))
            else:
                to_run.append(req)
        if done_before:
            self._handoff.call(self.drain)
        # A request whose earlier delivery reached the model and left no result may have
        # killed the worker: it runs alone, so it cannot use up its batch-mates' attempts.
        suspect = self._reached_model_before(to_run)
        fresh = [req for req in to_run if req.id not in suspect]
        for group in ([fresh] if fresh else []) + [[req] for req in to_run if req.id in suspect]:
            self._run_group(group, arrivals, started)
            started = self._clock()

    def _run_group(self, group: list[Request], arrivals: dict[str, float], started: float) -> None:
        """Run one model batch; store each outcome, then hand the acks to the loop."""
        attempts = self._count_attempts(group)
        runnable = [req for req in group if attempts[req.id] <= self._max_attempts]
        outcomes = {req.id: self._gave_up(req, attempts[req.id]) for req in group}
        if runnable:
            ran = self._executor.run([(req.id, req.kwargs) for req in runnable])
            outcomes.update((outcome.task_id, outcome) for outcome in ran)
        runtime = self._clock() - started
        for req in group:
            outcome = outcomes[req.id]
            try:
                self._store(req, outcome)
            except Exception:
                logger.exception("Could not store the result of %s; requeueing it", req.id)
                self._handoff.call(req.reject, True)
                continue
            self._completed.append(Completion(req, outcome, runtime, len(runnable)))
        self._handoff.call(self.drain)
        self._observe(group, outcomes, arrivals, started, runtime)

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

    def _observe(
        self,
        requests: list[Request],
        outcomes: dict[str, Outcome],
        arrivals: dict[str, float],
        started: float,
        runtime_s: float,
    ) -> None:
        if not self._observers or not requests:
            return
        results = [o.result for o in outcomes.values() if o.result is not None]
        stats = BatchStats(
            finished_at=time.time(),
            batch_size=len(requests),
            failed=sum(o.error is not None for o in outcomes.values()),
            pending=len(self._pending),
            queue_wait_ms=1000.0 * sum(started - arrivals[r.id] for r in requests) / len(requests),
            model_ms=runtime_s * 1000.0,
            prompt_tokens=sum(r["prompt_tokens"] for r in results),
            answer_tokens=sum(r["answer_tokens"] for r in results),
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
