"""The worker bootstep that loads the model once and runs the loop beside Celery's."""

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool

from producer.config import is_redis_url
from producer.errors import ConfigurationError
from producer.ledger import Ledger
from worker.celery_delivery import CeleryDelivery
from worker.executor import RequestReader
from worker.factory import build_executor
from worker.handoff import LoopHandoff
from worker.loop import BatchLoop
from worker.parts import WorkerParts
from worker.sweeper import make_sweeper

logger = logging.getLogger(__name__)


def refuse_prefork(pool_cls: Any) -> None:
    """CUDA does not survive ``fork``: the model must live in the worker's main process."""
    if isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool):
        raise ConfigurationError(
            "the prefork pool cannot serve a GPU model (CUDA does not survive fork); "
            "start the worker with --pool=solo (the default for vlmq) or --pool=threads"
        )


class BatchingStep(bootsteps.StartStopStep):
    """Loads and warms the model before the consumer starts, then runs the loop.

    The worker blueprint starts this step before ``Consumer`` (which is always last), so
    no message is taken before the model is ready; on shutdown the consumer stops first
    and this step lets the batch in flight finish, stores its results and acks them.
    """

    requires = ("celery.worker.components:Hub", "celery.worker.components:Pool")

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        refuse_prefork(worker.pool_cls)
        worker.app.vlmq.loop = worker.app.vlmq.sweeper = None  # none from an earlier worker

    def start(self, worker: Any) -> None:
        app = worker.app
        parts: WorkerParts = app.vlmq
        settings = parts.settings
        reader = RequestReader(parts.images, settings.limits, settings.served_model)
        transport = app.conf.broker_transport_options or {}
        executor = build_executor(
            settings, reader, visibility_timeout_s=transport.get("visibility_timeout", 3600)
        )
        parts.loop = BatchLoop(
            executor,
            CeleryDelivery(app, LoopHandoff(worker.hub)),
            max_wait_s=settings.max_wait_s,
            max_attempts=settings.max_attempts,
            observers=parts.observers,
            on_stored=_ledger_forget(app),
        )
        parts.loop.start()
        parts.sweeper = make_sweeper(app, settings.sweep_interval_s, parts.images)
        if parts.sweeper is not None:
            parts.sweeper.start()

    def stop(self, worker: Any) -> None:
        parts: WorkerParts = worker.app.vlmq
        if parts.sweeper is not None:
            parts.sweeper.stop()
        if parts.loop is not None:
            parts.loop.stop()

    terminate = stop


def _ledger_forget(app: Any) -> Callable[[list[str]], None] | None:
    """The ledger's ``forget`` on a Redis broker (producers record tasks there); else None."""
    if not is_redis_url(app.conf.broker_url):
        return None
    import redis

    return Ledger(redis.Redis.from_url(str(app.conf.broker_url))).forget
