"""The dead-letter list: broker entries that no worker could decode or run, kept for a look.

A worker that takes an entry it cannot turn into a task — bytes that are not JSON, JSON that is
not a kombu message, a body that is not Celery's ``[args, kwargs, embed]``, wrong headers, an
unknown task name or content type — takes it off the queue and records it here instead of
failing on it. The Redis list :data:`DEAD_LETTERS` holds the newest :data:`MAX_ENTRIES`, each
with the raw bytes (the first :data:`MAX_RAW_BYTES`), the reason, the time and the queue list
it was taken from; ``vlmq dead list`` shows them and ``vlmq dead replay`` pushes entries back.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.keys import DEAD_LETTERS

MAX_ENTRIES = 10_000
MAX_RAW_BYTES = 64 * 1024
_MAX_REASON_CHARS = 1000
# Atomically: drop the dead letter ARGV[1] and, if it was still there, push its bytes ARGV[2]
# back onto its queue list (where kombu's BRPOP takes it, as if just published).
_MOVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class DeadLetter:
    """One quarantined broker entry."""

    reason: str
    #: The Redis list it was taken from (a priority queue's list name included).
    queue: str
    #: The entry's bytes, cut to :data:`MAX_RAW_BYTES`.
    raw: bytes
    #: The length of the whole entry; more than ``len(raw)`` when it was cut.
    size: int
    task_id: str | None = None
    dead_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, raw: bytes, reason: str, queue: str, task_id: str | None = None) -> DeadLetter:
        """A dead letter for the whole entry ``raw``: its bytes are cut, its reason too."""
        return cls(
            reason=reason[:_MAX_REASON_CHARS],
            queue=queue,
            raw=raw[:MAX_RAW_BYTES],
            size=len(raw),
            task_id=task_id,
        )

    @property
    def truncated(self) -> bool:
        return self.size > len(self.raw)

    def preview(self, chars: int = 200) -> str:
        """The start of the raw bytes as text (undecodable bytes escaped), for people."""
        text = self.raw[: chars * 4].decode("utf-8", errors="backslashreplace")
        return text if len(text) <= chars else text[: chars - 3] + "..."

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dead_at": self.dead_at,
            "queue": self.queue,
            "task_id": self.task_id,
            "reason": self.reason,
            "size": self.size,
            "raw_b64": base64.b64encode(self.raw).decode("ascii"),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        """Raises ValueError (or a subclass) on anything but what :meth:`to_json` wrote."""
        data = json.loads(text)
        try:
            return cls(
                reason=str(data["reason"]),
                queue=str(data["queue"]),
                raw=base64.b64decode(data["raw_b64"], validate=True),
                size=int(data["size"]),
                task_id=data["task_id"],
                dead_at=float(data["dead_at"]),
                id=str(data["id"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a dead letter: {exc!r}") from exc


class DeadLetters:
    """The bounded dead-letter list in Redis, newest first."""

    def __init__(self, client: redis.Redis, max_entries: int = MAX_ENTRIES) -> None:
        self._redis = client
        self._max_entries = max_entries

    def add(self, letter: DeadLetter) -> None:
        """Record ``letter``; the oldest entries beyond the bound are dropped."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(DEAD_LETTERS, letter.to_json())
            pipe.ltrim(DEAD_LETTERS, 0, self._max_entries - 1)
            pipe.execute()

    def count(self) -> int:
        return int(self._redis.llen(DEAD_LETTERS))

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The newest ``limit`` entries (all if None), newest first."""
        return [letter for _, letter in self._entries(limit)]

    def replay(self, ids: Iterable[str] | None = None) -> list[DeadLetter]:
        """Push the raw bytes of the entries ``ids`` (all whole ones if None) back onto their
        queue list, each removed from the dead letters at the same time; returns those replayed
        (an entry replayed by someone else meanwhile is skipped).

        Raises:
            ValueError: an id is unknown, or its entry was cut (its bytes are not whole).
        """
        entries = self._entries(None)
        if ids is None:
            chosen = [(raw, letter) for raw, letter in entries if not letter.truncated]
        else:
            wanted = list(dict.fromkeys(ids))
            by_id = {letter.id: (raw, letter) for raw, letter in entries}
            unknown = [i for i in wanted if i not in by_id]
            if unknown:
                raise ValueError(f"no dead letter with id {', '.join(unknown)}")
            chosen = [by_id[i] for i in wanted]
            cut = [letter.id for _, letter in chosen if letter.truncated]
            if cut:
                raise ValueError(
                    f"dead letter {', '.join(cut)} kept only its first {MAX_RAW_BYTES} bytes; "
                    "it cannot be replayed"
                )
        move = self._redis.register_script(_MOVE_BACK)
        return [  # oldest first, as they arrived
            letter
            for raw, letter in reversed(chosen)
            if move(keys=[DEAD_LETTERS, letter.queue], args=[raw, letter.raw])
        ]

    def _entries(self, limit: int | None) -> list[tuple[bytes, DeadLetter]]:
        raws = self._redis.lrange(DEAD_LETTERS, 0, -1 if limit is None else limit - 1)
        return [(raw, DeadLetter.from_json(raw)) for raw in raws]
