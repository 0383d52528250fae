"""Celery's delivery: the event loop announces, stores, acks; the result backend dedupes.

Thread rules (see celery's worker internals): the event-loop thread owns the broker
connection, worker state and the event dispatcher; the model thread owns the GPU.
Everything that touches the former is handed to the loop through :class:`LoopHandoff`.
Result storage runs on the model thread (the result backend is thread-local).
"""

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from celery import states
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from celery.worker.state import task_accepted, task_ready

from producer.keys import ATTEMPTS_TTL_S, attempts_key
from worker.delivery import Completion
from worker.executor import Outcome
from worker.handoff import LoopHandoff

logger = logging.getLogger(__name__)


class CeleryDelivery:
    """:class:`worker.delivery.Delivery` for Celery ``Request`` objects of one worker."""

    def __init__(self, app: Any, handoff: LoopHandoff) -> None:
        self._app = app  # app.backend is thread-local: read it on the model thread
        self._handoff = handoff
        self._completed: deque[Completion] = deque()

    def begin(self, items: Sequence[Request], give_up: Callable[[], bool]) -> list[Request] | None:
        ok, live = self._handoff.call_and_wait(_begin, list(items), give_up=give_up)
        return live if ok else None

    def already_stored(self, items: Sequence[Request]) -> set[str]:
        backend = self._app.backend
        keys = [backend.get_key_for_task(req.id) for req in items]
        done = set()
        for req, raw in zip(items, self._mget(keys), strict=True):
            if raw and backend.decode_result(raw).get("status") in states.READY_STATES:
                done.add(req.id)
        return done

    def reached_model_before(self, items: Sequence[Request]) -> set[str]:
        if not items:
            return set()
        found = self._mget([attempts_key(req.id) for req in items])
        return {req.id for req, raw in zip(items, found, strict=True) if raw}

    def count_attempts(self, items: Sequence[Request]) -> dict[str, int]:
        backend = self._app.backend
        counts = {}
        for req in items:
            key = attempts_key(req.id)
            try:
                counts[req.id] = int(backend.incr(key))
            except KeyError:  # the cache backend (in-memory demo) cannot incr a missing key
                backend.set(key, 1)
                counts[req.id] = 1
            backend.expire(key, ATTEMPTS_TTL_S)
        return counts

    def store(self, item: Request, outcome: Outcome) -> None:
        backend = self._app.backend
        if outcome.error is None:
            backend.mark_as_done(item.id, outcome.result, request=item._context)
        else:
            backend.mark_as_failure(
                item.id, outcome.error, traceback=outcome.traceback, request=item._context
            )

    def finish(self, completions: Sequence[Completion]) -> None:
        self._completed.extend(completions)
        self._handoff.call(self.drain)

    def requeue(self, item: Request) -> None:
        self._handoff.call(item.reject, True)

    def drain(self) -> None:
        """Announce and acknowledge every completion (event-loop thread, or at shutdown)."""
        while self._completed:
            c = self._completed.popleft()
            try:
                _announce(c)
            except Exception:  # an event lost (e.g. to a broker hiccup) must not skip the ack
                logger.exception("Could not send the events of task %s", c.item.id)
            c.item.acknowledge()

    def _mget(self, keys: list[str]) -> list[Any]:
        found = self._app.backend.mget(keys)
        if isinstance(found, dict):  # the cache backend answers with a mapping
            return [found.get(key) for key in keys]
        return found


def _begin(batch: list[Request]) -> list[Request]:
    live = []
    for req in batch:
        if req.revoked():  # a revoke or `expires` that came while it was buffered
            continue
        task_accepted(req)
        req.send_event("task-started")
        live.append(req)
    return live


def _announce(c: Completion) -> None:
    req, outcome = c.item, c.outcome
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


#: The texts of a result, shown after its figures in the ``task-succeeded`` event.
_TEXT_FIELDS = ("answer", "stages")


def shown_result(result: dict[str, Any], maxlen: int = 1024) -> str:
    """The result as a ``task-succeeded`` event carries it (Flower's task page shows it):
    token counts, timings and batch size first, so a long answer cut at ``maxlen`` never
    hides them."""
    ordered = {k: v for k, v in result.items() if k not in _TEXT_FIELDS}
    ordered.update({k: result[k] for k in _TEXT_FIELDS if k in result})
    return saferepr(ordered, maxlen=maxlen)
