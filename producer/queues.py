"""vlmq's queues in Redis: how they are routed, how deep they are, how old their oldest task is.

Every queue is bound to one direct exchange, named like the shared queue (``vlmq``), under
its own name as routing key: a message reaches exactly the queue it names.

With ``queue_order_strategy=priority`` kombu keeps one Redis list per priority step:
``vlmq`` (priority 0) and ``vlmq<sep>1`` … ``vlmq<sep>9`` (kombu's separator, left at its
default so that every Celery tool, Flower included, agrees with the workers); producers LPUSH,
workers BRPOP, so each list's oldest message is at its right end.
"""

import base64
import json
import time
from dataclasses import dataclass

import redis
from kombu import Exchange, Queue
from kombu.transport.redis import Channel

PRIORITY_STEPS = range(10)


def routed_queue(name: str, exchange: str) -> Queue:
    """Queue ``name`` bound to the direct ``exchange`` with routing key ``name``."""
    return Queue(name, Exchange(exchange, type="direct"), routing_key=name)


def drop_stale_bindings(client: redis.Redis, exchange: str) -> list[str]:
    """Unbind from ``exchange`` every queue bound under a routing key other than its name.

    Before routing was exact, every queue was bound under the key ``vlmq``, so one publish
    reached them all; kombu keeps bindings forever. Returns the queues unbound.
    """
    key = Channel.keyprefix_queue % exchange
    stale, queues = [], []
    for member in client.smembers(key):
        routing_key, _pattern, queue = member.decode().split(Channel.sep)
        if routing_key != queue:
            stale.append(member)
            queues.append(queue)
    if stale:
        client.srem(key, *stale)
    return queues


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, highest priority first."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


@dataclass(frozen=True)
class QueueStats:
    """A queue's backlog: waiting messages and the age of the oldest (None: empty/unknown)."""

    queue: str
    depth: int
    oldest_age_s: float | None


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` (all priorities), not counting those a worker holds."""
    with client.pipeline(transaction=False) as pipe:
        for name in priority_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())


def queue_stats(client: redis.Redis, queue: str, now: float | None = None) -> QueueStats:
    """Depth and oldest waiting age of ``queue``; the age comes from ``submitted_at``."""
    lists = priority_lists(queue)
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.llen(name)
            pipe.lindex(name, -1)
        replies = pipe.execute()
    depth = sum(replies[0::2])
    submitted = [t for t in map(_submitted_at, replies[1::2]) if t is not None]
    now = time.time() if now is None else now
    oldest = max(0.0, now - min(submitted)) if submitted else None
    return QueueStats(queue=queue, depth=depth, oldest_age_s=oldest)


def _submitted_at(raw: bytes | None) -> float | None:
    """``submitted_at`` of a kombu Redis message carrying a vlmq task, else None."""
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        value = kwargs["submitted_at"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
