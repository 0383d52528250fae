"""The sweeper: sends again an accepted task whose message was lost with a killed worker.

kombu's Redis transport pops a message (``BRPOP``) and records it as unacked only afterwards;
a worker killed between the two takes the message with it, and kombu's visibility-timeout
restore never sees it. Every task a :class:`~producer.client.Client` accepts is in the ledger
(:mod:`producer.ledger`) until its outcome is stored. Every ``VLMQ_SWEEP_INTERVAL_S`` one
worker's sweeper (a Redis lock picks it) takes the entries unseen for longer than the grace
(the visibility timeout plus :data:`MARGIN_S`) and looks for each task, in this order:

1. a stored final result: the entry is dropped;
2. its message held by a worker (kombu's ``unacked`` hash), or waiting in its queue's
   priority list, or held again after it: the task is alive, its entry is marked seen and its
   image's claim-check TTL restarts (a task waiting in a long queue keeps its image);
3. otherwise the task is missing. Missing on two consecutive sweeps — the second time after
   a scan of all its queue's lists that no concurrent push or pop can fool — it is lost: it
   is published again with the same task id. A redelivery is harmless: a worker acks a task
   that has a result without running it, and counts the attempts of one that has none.

Cost: in steady state (every task answered within the grace) a sweep is one ``ZRANGE``. An
entry past the grace costs its share of one ``MGET``, one ``HVALS`` of ``unacked`` (as many
messages as workers hold) and a read of its priority list from the oldest end up to it — only
the part of the queue that has waited longer than the grace; a task found alive is not
looked for again for another grace. A missing task costs a full read of its list, and of
its queue's lists once more when it is confirmed. At most :data:`BATCH` entries per sweep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from celery import states

from producer.claimcheck import ImageStore
from producer.config import is_redis_url
from producer.keys import LEDGER_RESENT, SWEEPER_LOCK, result_key
from producer.ledger import Ledger, LedgerEntry
from producer.queues import priority_lists

logger = logging.getLogger(__name__)

#: Added to the visibility timeout: a message of a dead worker is restored within kombu's
#: 10 s restore sweep after it, so a task is never sought while that restore may be due.
MARGIN_S = 10
#: Ledger entries examined per sweep, the longest unseen first.
BATCH = 1000
#: List elements read per LRANGE.
CHUNK = 500
#: Elements read again at each chunk boundary when reading from the oldest end, where
#: workers pop (each pop moves the rest one step toward that end).
OVERLAP = 100

# The task id in a kombu Redis message (Celery protocol 2 puts it in the headers; the body is
# base64, so the first match is the id).
_TASK_ID = re.compile(rb'"id":\s*"([^"\\]+)"')


def grace_s(visibility_timeout_s: float) -> float:
    """How long a ledger entry may go unseen before its task is looked for."""
    return visibility_timeout_s + MARGIN_S


def task_id_of(raw: bytes) -> str | None:
    """The task id of a raw kombu Redis message (queue element or ``unacked`` value)."""
    match = _TASK_ID.search(raw)
    return match.group(1).decode() if match else None


@dataclass(frozen=True)
class Verdict:
    """Where a sweep found the tasks it looked for."""

    done: set[str]  # a final result is stored
    alive: set[str]  # waiting in a queue or held by a worker
    missing: set[str]  # neither


def confirm(missing: set[str], suspects: set[str]) -> tuple[set[str], set[str]]:
    """Split this sweep's missing tasks into those missing at the previous sweep too (to be
    checked thoroughly, then sent again) and the new suspects."""
    return missing & suspects, missing - suspects


@dataclass(frozen=True)
class SweepReport:
    examined: int = 0
    done: int = 0
    alive: int = 0
    suspects: int = 0
    resent: int = 0


class Sweeper:
    """Finds lost tasks in the ledger and sends them again (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        resend: Callable[[LedgerEntry], None],
        *,
        grace_s: float,
        interval_s: float,
        unacked_key: str = "unacked",
        keep_images: Callable[[list[str]], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._keep_images = keep_images
        self._ledger = Ledger(client)
        self._resend = resend
        self.grace_s = grace_s
        self.interval_s = interval_s
        self._unacked_key = unacked_key
        self._clock = clock
        self._suspects: set[str] = set()
        self._lock = client.lock(
            SWEEPER_LOCK, timeout=max(3 * interval_s, 60), blocking=False, thread_local=False
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one sweep -------------------------------------------------------------------------
    def sweep(self) -> SweepReport:
        """Look for the tasks unseen for longer than the grace; send the lost ones again."""
        now = self._clock()
        entries = {e.task_id: e for e in self._ledger.unseen_since(now - self.grace_s, BATCH)}
        if not entries:
            self._suspects = set()
            return SweepReport()
        verdict = self._locate(list(entries.values()), thorough=False)
        self._ledger.forget(verdict.done)
        self._alive(verdict.alive, entries, now)
        recheck, self._suspects = confirm(verdict.missing, self._suspects)
        resent = 0
        if recheck:
            again = self._locate([entries[i] for i in recheck], thorough=True)
            self._ledger.forget(again.done)
            self._alive(again.alive, entries, now)
            for task_id in sorted(again.missing):
                resent += self._send_again(entries[task_id], now)
        return SweepReport(
            examined=len(entries),
            done=len(verdict.done),
            alive=len(verdict.alive),
            suspects=len(self._suspects),
            resent=resent,
        )

    def _alive(self, task_ids: set[str], entries: dict[str, LedgerEntry], now: float) -> None:
        """Mark tasks found alive as seen, and restart their images' TTL: a task waiting in a
        long queue keeps its image (each alive task is found once per grace)."""
        self._ledger.seen(task_ids, now)
        found = {entries[i].kwargs.get("image_key") for i in task_ids}
        keys = sorted(key for key in found if isinstance(key, str))
        if keys and self._keep_images is not None:
            self._keep_images(keys)

    def _send_again(self, entry: LedgerEntry, now: float) -> int:
        logger.warning(
            "Task %s was lost: %.0f s after it was submitted it has no result, no message in "
            "queue %s and none held by a worker; sending it again",
            entry.task_id, now - entry.submitted_at, entry.queue,
        )  # fmt: skip
        try:
            self._resend(entry)
        except Exception:
            logger.exception("Could not send task %s again; the next sweeps retry", entry.task_id)
            return 0
        self._ledger.seen([entry.task_id], now)
        self._redis.incr(LEDGER_RESENT)
        return 1

    def _locate(self, entries: list[LedgerEntry], *, thorough: bool) -> Verdict:
        """Where each task is. The order of the looks means a message moving on meanwhile
        (queue -> held -> result, or held -> back in the queue) is seen at least once."""
        wanted = {e.task_id for e in entries}
        done = self._stored(wanted)
        wanted -= done
        alive = self._held(wanted)
        wanted -= alive
        queued = self._queued([e for e in entries if e.task_id in wanted], thorough=thorough)
        wanted -= queued
        held_now = self._held(wanted)
        wanted -= held_now
        stored_now = self._stored(wanted)
        wanted -= stored_now
        return Verdict(done | stored_now, alive | queued | held_now, wanted)

    def _stored(self, task_ids: set[str]) -> set[str]:
        if not task_ids:
            return set()
        ids = sorted(task_ids)
        found = self._redis.mget([result_key(i) for i in ids])
        return {i for i, raw in zip(ids, found, strict=True) if raw and _is_final(raw)}

    def _held(self, task_ids: set[str]) -> set[str]:
        if not task_ids:
            return set()
        return _ids_in(self._redis.hvals(self._unacked_key), task_ids)

    def _queued(self, entries: list[LedgerEntry], *, thorough: bool) -> set[str]:
        """Tasks whose message waits in its queue. Quick: each task's own priority list, read
        from the oldest end until all are found. Thorough: every list of the queue, from the
        newest end (where pushes land), so no element still there is skipped."""
        if not entries:
            return set()
        by_list: defaultdict[str, set[str]] = defaultdict(set)
        for e in entries:
            lists = priority_lists(e.queue)
            for name in lists if thorough else [lists[_step(e.priority)]]:
                by_list[name].add(e.task_id)
        found: set[str] = set()
        for name, ids in by_list.items():
            found |= self._scan(name, ids - found, newest_first=thorough)
        return found

    def _scan(self, name: str, ids: set[str], *, newest_first: bool) -> set[str]:
        found: set[str] = set()
        start = 0
        while ids - found:
            if newest_first:
                chunk = self._redis.lrange(name, start, start + CHUNK - 1)
                start += CHUNK
            else:
                chunk = self._redis.lrange(name, -(start + CHUNK), -(start + 1))
                start += CHUNK - OVERLAP
            found |= _ids_in(chunk, ids)
            if len(chunk) < CHUNK:
                break
        return found

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlmq-sweeper", daemon=True)
        self._thread.start()
        logger.info(
            "Sweeper: every %g s, sends again accepted tasks lost for more than %g s",
            self.interval_s, self.grace_s,
        )  # fmt: skip

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        # Not held, or Redis is gone (LockError is a RedisError): it expires by itself.
        with contextlib.suppress(redis.RedisError):
            self._lock.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._hold_lock():
                    self._suspects = set()  # another worker sweeps; start afresh if we take over
                    continue
                report = self.sweep()
                if report.examined:
                    logger.info("Sweep: %s", report)
            except redis.RedisError as exc:
                self._suspects = set()
                logger.warning("Sweep skipped: %r", exc)
            except Exception:
                self._suspects = set()
                logger.exception("Sweep failed")

    def _hold_lock(self) -> bool:
        if self._lock.local.token is not None:
            try:
                self._lock.reacquire()
                return True
            except redis.exceptions.LockError:
                self._lock.local.token = None  # it expired and another worker took it
        return bool(self._lock.acquire(blocking=False))


def _step(priority: int | None) -> int:
    """The priority list (index into :func:`priority_lists`) kombu puts a message in."""
    return min(max(priority or 0, 0), 9)


def _is_final(raw: bytes) -> bool:
    try:
        return json.loads(raw).get("status") in states.READY_STATES
    except (ValueError, AttributeError):
        return False


def _ids_in(raws: Iterable[bytes], ids: set[str]) -> set[str]:
    found = set()
    for raw in raws:
        task_id = task_id_of(raw)
        if task_id in ids:
            found.add(task_id)
    return found


def make_sweeper(app: Any, interval_s: float, images: Any = None) -> Sweeper | None:
    """The sweeper for a worker app on a Redis broker; None when ``interval_s`` is 0 or the
    broker is something else (the demo's in-memory transport). With ``images`` (an
    :class:`~producer.claimcheck.ImageStore`) it keeps the images of waiting tasks stored."""
    url = str(app.conf.broker_url or "")
    if not interval_s or not is_redis_url(url):
        return None
    transport = app.conf.broker_transport_options or {}
    grace = grace_s(transport.get("visibility_timeout", 3600))
    keep_images = images.keep if isinstance(images, ImageStore) else None
    if keep_images is not None and images.ttl_s <= grace + 2 * interval_s:
        logger.warning(
            "VLMQ_IMAGE_TTL_S=%d is not above the sweeper's grace (%g s) plus two sweeps: the "
            "image of a task waiting that long can expire before the sweeper keeps it",
            images.ttl_s, grace,
        )  # fmt: skip

    return Sweeper(
        redis.Redis.from_url(url),
        lambda entry: entry.publish(app),
        grace_s=grace,
        interval_s=interval_s,
        unacked_key=transport.get("unacked_key", "unacked"),
        keep_images=keep_images,
    )
