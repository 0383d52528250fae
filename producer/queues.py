"""How deep a vlmq queue is and how long its oldest task has waited — read from Redis.

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
from kombu.transport.redis import Channel

PRIORITY_STEPS = range(10)


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
