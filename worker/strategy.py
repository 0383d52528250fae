"""The Celery strategy that buffers batched tasks instead of running them in the pool."""

import logging
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker.request import create_request_cls
from celery.worker.state import task_reserved, task_scheduled
from kombu.asynchronous.timer import to_timestamp

from worker.quarantine import task_message_problem

logger = logging.getLogger(__name__)


def batching_strategy(task: Any, app: Any, consumer: Any, **_: Any):
    """Build the message handler for ``task``: validate, announce, then buffer.

    A message that is not a well-formed ``vlmq.analyze`` task raises ``InvalidTaskError``:
    the consumer (:mod:`worker.consumer`) quarantines it.

    A task with an ETA or countdown waits on the worker's timer, as with Celery's own
    strategy, and enters the buffer when due. Runs on the event-loop thread. Kombu re-creates
    strategies on every broker (re)connect, after restoring unacked messages to the queue, so
    requests still buffered from the old connection are dropped here: they will be delivered
    again.
    """
    loop = app.vlmq.loop
    loop.drop_pending()
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    task_sends_events = eventer is not None and eventer.enabled and task.send_events
    Request = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    revoked_tasks = consumer.controller.state.revoked

    def buffer(req: Any) -> None:
        task_reserved(req)
        loop.add(req)

    def due(req: Any) -> None:
        buffer(req)
        consumer.qos.decrement_eventually()

    def task_message_handler(message, body, ack, reject, callbacks, **__):
        # A message that is not a vlmq task goes to the consumer's quarantine, never further.
        problem = task_message_problem(message)
        if problem is not None:
            raise InvalidTaskError(problem)
        try:
            req = Request(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=hostname,
                eventer=eventer,
                task=task,
                connection_errors=consumer.connection_errors,
                body=message.body,
                headers=message.headers,
                decoded=False,
                utc=app.uses_utc_timezone(),
            )
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise InvalidTaskError(f"unreadable task message: {type(exc).__name__}: {exc}") from exc
        logger.debug("Received %s[%s]", req.name, req.id)
        # revoked() also honours `expires`: it stores REVOKED, sends task-revoked, acks.
        if (req.expires or req.id in revoked_tasks) and req.revoked():
            return
        signals.task_received.send(sender=consumer, request=req)
        if task_sends_events:
            eventer.send(
                "task-received",
                uuid=req.id,
                name=req.name,
                args=req.argsrepr,
                kwargs=req.kwargsrepr,
                root_id=req.root_id,
                parent_id=req.parent_id,
                retries=req.request_dict.get("retries", 0),
                eta=req.eta and req.eta.isoformat(),
                expires=req.expires and req.expires.isoformat(),
            )
        if req.eta:
            try:
                eta = (
                    to_timestamp(timezone.to_system(req.eta))
                    if req.utc
                    else to_timestamp(req.eta, app.timezone)
                )
            except (OverflowError, ValueError) as exc:
                raise InvalidTaskError(f"unreadable eta {req.eta!r}: {exc}") from exc
            # Held messages stay unacked: let the worker fetch more meanwhile, as Celery does.
            consumer.qos.increment_eventually()
            req._eta_timer_entry = consumer.timer.call_at(eta, due, (req,), priority=6)
            task_scheduled(req)  # the consumer cancels the timer if the connection is lost
            return
        buffer(req)

    return task_message_handler
