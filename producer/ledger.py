"""The ledger of accepted tasks: enough to send a task again should its message be lost.

kombu's Redis transport takes a message with ``BRPOP`` and records it as unacked only
afterwards, so a worker killed between the two loses the message. :class:`~producer.client.Client`
therefore writes each task here before publishing it; the worker forgets the entry once the
task's final outcome is stored; and the worker's sweeper (``worker/sweeper.py``) sends again a
task that has neither a result nor a message, with the same task id.

Two keys in the broker's Redis (:mod:`producer.keys`): the hash ``LEDGER_ENTRIES`` (task id ->
JSON entry) and the sorted set ``LEDGER_SEEN`` (task id -> epoch seconds when the task was last
known alive: submitted, found waiting in its queue or held by a worker, or sent again).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from producer.keys import LEDGER_ENTRIES, LEDGER_SEEN
from producer.protocol import TASK_NAME
from producer.queues import routed_queue


@dataclass(frozen=True)
class LedgerEntry:
    """One accepted task, as :meth:`Client.submit` sent it."""

    task_id: str
    queue: str
    kwargs: dict[str, Any]
    priority: int | None
    #: ISO 8601, exactly as the message's ``expires`` header; None: never expires.
    expires: str | None
    submitted_at: float  # epoch seconds

    def publish(self, app: Any, producer: Any = None) -> None:
        """Send this task's message with Celery ``app`` (through ``producer`` if given)."""
        app.send_task(
            TASK_NAME,
            kwargs=self.kwargs,
            task_id=self.task_id,
            queue=routed_queue(self.queue, app.conf.task_default_queue),
            priority=self.priority,
            expires=self.expires,
            producer=producer,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> LedgerEntry:
        """Raises ValueError (or a subclass) on anything but an entry :meth:`to_json` wrote."""
        data = json.loads(raw)
        if not isinstance(data, Mapping) or not isinstance(data.get("kwargs"), Mapping):
            raise ValueError(f"not a ledger entry: {raw!r:.80}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"not a ledger entry: {exc}") from None


class Ledger:
    """The ledger in Redis; every method is one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, entries: Sequence[LedgerEntry]) -> None:
        """Record ``entries`` (one transaction: an entry is never half written)."""
        if not entries:
            return
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(LEDGER_ENTRIES, mapping={e.task_id: e.to_json() for e in entries})
            pipe.zadd(LEDGER_SEEN, {e.task_id: e.submitted_at for e in entries})
            pipe.execute()

    def forget(self, task_ids: Iterable[str]) -> None:
        """Drop the entries of ``task_ids`` (their outcomes are stored)."""
        ids = list(task_ids)
        if not ids:
            return
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(LEDGER_ENTRIES, *ids)
            pipe.zrem(LEDGER_SEEN, *ids)
            pipe.execute()

    def unseen_since(self, since: float, limit: int) -> list[LedgerEntry]:
        """Up to ``limit`` entries last known alive before ``since``, the longest unseen first.

        An id whose entry is missing or unreadable is dropped from the ledger.
        """
        found = self._redis.zrange(
            LEDGER_SEEN, "-inf", f"({since}", byscore=True, offset=0, num=limit
        )
        ids = [raw.decode() if isinstance(raw, bytes) else raw for raw in found]
        if not ids:
            return []
        entries, broken = [], []
        for task_id, raw in zip(ids, self._redis.hmget(LEDGER_ENTRIES, ids), strict=True):
            try:
                entries.append(LedgerEntry.from_json(raw))
            except (TypeError, ValueError):  # TypeError: raw is None
                broken.append(task_id)
        self.forget(broken)
        return entries

    def seen(self, task_ids: Iterable[str], at: float) -> None:
        """Note that ``task_ids`` were alive at ``at``; an entry forgotten meanwhile stays so."""
        mapping = dict.fromkeys(task_ids, at)
        if mapping:
            self._redis.zadd(LEDGER_SEEN, mapping, xx=True)

    def __len__(self) -> int:
        return int(self._redis.hlen(LEDGER_ENTRIES))

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and bool(self._redis.hexists(LEDGER_ENTRIES, task_id))
