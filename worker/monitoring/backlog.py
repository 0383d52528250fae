"""How many messages wait in the broker for a worker's queues, and in the worker itself."""

import logging
from collections.abc import Sequence

import redis
from celery.worker import state as worker_state

from producer.queues import queue_depth

logger = logging.getLogger(__name__)


class BrokerBacklog:
    """Counts the messages waiting in the Redis lists of ``queues``.

    A failure gives ``None`` (logged once per outage), so a broker outage, or a broker that
    is not Redis, shows as an absent figure, never a crash; the client reconnects by itself.
    """

    def __init__(self, broker_url: str, queues: Sequence[str]) -> None:
        self._broker_url = broker_url
        self._queues = list(queues)
        self._client: redis.Redis | None = None
        self._failing = False

    def depth(self) -> int | None:
        """Messages waiting; ``None`` when unknown (not Redis, or Redis unreachable)."""
        try:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self._broker_url, socket_timeout=2, socket_connect_timeout=2
                )
            total = sum(queue_depth(self._client, queue) for queue in self._queues)
        except Exception as exc:
            if not self._failing:
                logger.warning("Cannot read the queue depth from Redis: %s", exc)
            self._failing = True
            return None
        self._failing = False
        return total

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def buffered_requests() -> int:
    """Requests this worker holds that have not started: reserved but not yet active."""
    return max(0, len(worker_state.reserved_requests) - len(worker_state.active_requests))
