"""The worker bootstep that loads the model once and runs the loop beside Celery's."""

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from celery import bootsteps, concurrency

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


#: The pools that run vlmq's batcher: the model lives in the worker's own process.
POOLS = ("solo", "threads")


def requested_pool(argv: Sequence[str]) -> str | None:
    """The pool named on a ``celery worker`` command line (``--pool=X``, ``--pool X``,
    ``-P X``, ``-PX``; the last one counts), or None."""
    pool = None
    for i, arg in enumerate(argv):
        if arg.startswith("--pool="):
            pool = arg.removeprefix("--pool=")
        elif arg in ("--pool", "-P") and i + 1 < len(argv):
            pool = argv[i + 1]
        elif arg.startswith("-P") and len(arg) > 2 and not arg.startswith("--"):
            pool = arg[2:]
    return pool


def refuse_unsupported_pool(pool_cls: Any, argv: Sequence[str]) -> None:
    """Only the solo and threads pools keep the model in the worker's process; Celery itself
    replaces an explicit ``--pool=prefork`` by the configured pool, so ``argv`` is read too."""
    named = requested_pool(argv)
    if named is None and isinstance(pool_cls, type):
        named = next(
            (name for name in POOLS if pool_cls is concurrency.get_implementation(name)),
            pool_cls.__module__.rsplit(".", 1)[-1],
        )
    if named is not None and named not in POOLS:
        raise ConfigurationError(
            f"the {named} pool cannot serve a GPU model (it runs tasks outside the process "
            "that holds the model, or in green threads; CUDA does not survive fork); start "
            "the worker with --pool=solo (the default for vlmq) or --pool=threads"
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
        refuse_unsupported_pool(worker.pool_cls, sys.argv)
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
