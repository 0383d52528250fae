"""The worker bootstep that removes queue bindings left from before exact routing."""

import logging
from typing import Any

from celery import bootsteps

from producer.config import is_redis_url
from producer.queues import drop_stale_bindings

logger = logging.getLogger(__name__)


class RoutingStep(bootsteps.StartStopStep):
    """Before the consumer declares this worker's queues, unbind the stale ones.

    A binding under a routing key other than its queue's name would deliver one message to
    several queues; only a Redis broker keeps bindings.
    """

    def start(self, worker: Any) -> None:
        app = worker.app
        if not is_redis_url(app.conf.broker_url):
            return
        import redis

        with redis.Redis.from_url(str(app.conf.broker_url)) as client:
            dropped = drop_stale_bindings(client, app.conf.task_default_queue)
        if dropped:
            logger.warning("Removed stale bindings of queues %s", ", ".join(sorted(dropped)))
