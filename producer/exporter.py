"""``vlmq exporter``: queue depth and oldest-task age for Prometheus, the autoscaling signal.

It reads Redis only (no worker needed), so it can drive scaling from zero workers.
Needs the ``monitor`` extra (prometheus-client).
"""

import re
import time
from collections.abc import Iterator

import redis
from kombu.transport.redis import Channel

from producer.queues import queue_stats

_PRIORITY_SUFFIX = re.compile(re.escape(Channel.sep) + "[1-9]$")


def discover_queues(client: redis.Redis, base_queue: str) -> list[str]:
    """The shared queue plus every per-model queue (``<base>.<model>``) that exists now."""
    found = {base_queue}
    for key in client.scan_iter(match=f"{base_queue}.*", _type="list", count=1000):
        found.add(_PRIORITY_SUFFIX.sub("", key.decode()))
    return sorted(found)


class QueueCollector:
    """A Prometheus collector that reads every vlmq queue from Redis at scrape time."""

    def __init__(self, client: redis.Redis, base_queue: str) -> None:
        self._client = client
        self._base_queue = base_queue

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "vlmq_queue_depth", "Tasks waiting in the queue (all priorities)", labels=["queue"]
        )
        age = GaugeMetricFamily(
            "vlmq_queue_oldest_age_seconds",
            "Age of the oldest waiting task (0 when the queue is empty)",
            labels=["queue"],
        )
        for queue in discover_queues(self._client, self._base_queue):
            stats = queue_stats(self._client, queue)
            depth.add_metric([queue], stats.depth)
            age.add_metric([queue], stats.oldest_age_s or 0.0)
        yield depth
        yield age


def serve(redis_url: str, base_queue: str, port: int, address: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``address:port`` until interrupted."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(QueueCollector(redis.Redis.from_url(redis_url), base_queue))
    start_http_server(port, addr=address, registry=registry)
    print(f"vlmq exporter: http://{address}:{port}/metrics (queues {base_queue}, {base_queue}.*)")
    while True:
        time.sleep(3600)
