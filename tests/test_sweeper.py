"""The ledger and the sweeper: pure parts on plain values, sweeps on the real Redis with a clock
moved past the grace (no worker; a lost message is made by popping it, as a killed worker
would)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import pytest
import redis
from PIL import Image

from producer.claimcheck import ImageStore
from producer.client import Client
from producer.config import Settings
from producer.keys import LEDGER_ENTRIES, LEDGER_RESENT, LEDGER_SEEN
from producer.ledger import Ledger, LedgerEntry
from producer.queues import priority_lists
from worker.sweeper import (
    BATCH,
    MARGIN_S,
    Sweeper,
    confirm,
    grace_s,
    make_sweeper,
    task_id_of,
)

VISIBILITY_S = 60


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


# -- pure parts ------------------------------------------------------------------------------


def test_grace_is_the_visibility_timeout_plus_the_margin() -> None:
    assert grace_s(7200) == 7200 + MARGIN_S


def test_task_id_of_a_kombu_message_reads_the_header_not_the_text() -> None:
    message = {
        "body": "W1tdLCB7fSwge31d",
        "content-encoding": "utf-8",
        "headers": {"task": "vlmq.analyze", "id": "abc-1", "kwargsrepr": '{"id": "evil"}'},
        "properties": {"correlation_id": "abc-1", "delivery_tag": "t"},
    }
    assert task_id_of(json.dumps(message).encode()) == "abc-1"
    assert task_id_of(json.dumps([message, "vlmq", "vlmq"]).encode()) == "abc-1"  # unacked
    assert task_id_of(b'{"headers": {}}') is None


def test_a_task_is_lost_only_when_missing_on_two_sweeps_in_a_row() -> None:
    assert confirm({"a", "b"}, set()) == (set(), {"a", "b"})
    assert confirm({"a", "b"}, {"b", "c"}) == ({"b"}, {"a"})
    assert confirm(set(), {"b"}) == (set(), set())


def test_ledger_entry_round_trip_and_refusals() -> None:
    entry = LedgerEntry("id1", "vlmq", {"question": "Why?"}, 3, "2030-01-01T00:00:00+00:00", 1.5)
    assert LedgerEntry.from_json(entry.to_json()) == entry
    for raw in ["[]", '{"task_id": "x"}', '{"kwargs": {}, "nope": 1}', "not json"]:
        with pytest.raises(ValueError):
            LedgerEntry.from_json(raw)


def test_a_worker_sweeps_only_on_a_redis_broker_with_an_interval() -> None:
    from producer.config import make_celery_app

    app = make_celery_app(Settings(redis_url="redis://127.0.0.1:6379/0", visibility_timeout_s=90))
    sweeper = make_sweeper(app, 30)
    assert sweeper is not None and (sweeper.grace_s, sweeper.interval_s) == (90 + MARGIN_S, 30)
    assert make_sweeper(app, 0) is None
    app.conf.broker_url = "memory://"
    assert make_sweeper(app, 30) is None


# -- sweeps on the real Redis ----------------------------------------------------------------


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    c = Client(Settings(redis_url=redis_url, visibility_timeout_s=VISIBILITY_S))
    yield c
    c.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def sweeper_on(r: redis.Redis, resent: list[LedgerEntry], clock: Clock) -> Sweeper:
    return Sweeper(r, resent.append, grace_s=grace_s(VISIBILITY_S), interval_s=1, clock=clock)


def hold(r: redis.Redis, raw: bytes, tag: str) -> None:
    """Put a message into kombu's unacked hash, as a worker that took it does."""
    r.zadd("unacked_index", {tag: time.time()})
    r.hset("unacked", tag, json.dumps([json.loads(raw), "vlmq", "vlmq"]))


def test_submit_writes_the_ledger_entry_the_message_matches(client: Client, r: redis.Redis):
    handles = client.submit_many(
        [(png(1), "First?"), {"image": png(2), "question": "Later?", "priority": 7, "expires": 60}]
    )
    ledger = Ledger(r)
    assert len(ledger) == 2 and all(h.id in ledger for h in handles)
    [entry] = [e for e in ledger.unseen_since(time.time() + 1, 10) if e.task_id == handles[1].id]
    [raw] = r.lrange(priority_lists("vlmq")[7], 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"] == entry.task_id
    assert message["headers"]["expires"] == entry.expires
    assert (entry.queue, entry.priority, entry.kwargs["question"]) == ("vlmq", 7, "Later?")


def test_a_submit_whose_publish_fails_leaves_no_ledger_entry(redis_url: str, r: redis.Redis):
    from producer.config import make_celery_app

    app = make_celery_app(Settings(redis_url=redis_url))
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens: the publish fails
    app.conf.task_publish_retry = False
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        **{"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0},
    }
    c = Client(Settings(redis_url=redis_url), app=app)
    try:
        with pytest.raises(Exception, match=r"(?i)connect"):
            c.submit(png(1), "Anyone?")
    finally:
        c.close()
    assert len(Ledger(r)) == 0


def test_sweeps_resend_a_lost_task_once_and_leave_the_others(client: Client, r: redis.Redis):
    handles = client.submit_many((png(i), f"Task {i}?") for i in range(6))
    ids = [h.id for h in handles]
    lost = r.rpop("vlmq")  # a worker killed right after BRPOP: the message is nowhere
    hold(r, r.rpop("vlmq"), "tag-1")  # a worker holds this one (unacked)
    client.app.backend.mark_as_done(ids[2], {"answer": "done"})  # answered, entry not dropped
    assert task_id_of(lost) == ids[0]

    resent: list[LedgerEntry] = []
    clock = Clock()
    sweeper = sweeper_on(r, resent, clock)
    assert sweeper.sweep().examined == 0  # nothing is past the grace yet

    clock.now += grace_s(VISIBILITY_S) + 1
    first = sweeper.sweep()
    assert (first.examined, first.done, first.alive, first.suspects) == (6, 1, 4, 1)
    assert resent == []  # missing once is not enough: a worker may be inside its fetch
    clock.now += 1
    second = sweeper.sweep()
    assert (second.examined, second.resent) == (1, 1)
    assert [e.task_id for e in resent] == [ids[0]]
    assert resent[0].kwargs["question"] == "Task 0?" and resent[0].queue == "vlmq"
    assert int(r.get(LEDGER_RESENT)) == 1
    assert ids[2] not in Ledger(r)  # dropped: its result is stored

    # The others were seen alive: none is looked for again before another grace.
    clock.now += 1
    assert sweeper.sweep().examined == 0
    clock.now += grace_s(VISIBILITY_S)
    again = sweeper.sweep()
    # The resent task is looked for again too; its new message is missing (nothing publishes
    # in this test), so it becomes a suspect, but the queued and held ones are still alive.
    assert (again.alive, again.resent) == (4, 0)


def test_a_task_that_comes_back_between_the_sweeps_is_not_resent(client: Client, r: redis.Redis):
    [handle] = client.submit_many([(png(1), "Back?")])
    raw = r.rpop("vlmq")
    resent: list[LedgerEntry] = []
    clock = Clock()
    sweeper = sweeper_on(r, resent, clock)
    clock.now += grace_s(VISIBILITY_S) + 1
    assert sweeper.sweep().suspects == 1
    hold(r, raw, "tag-2")  # the worker in its fetch window records it as unacked after all
    clock.now += 1
    assert sweeper.sweep().resent == 0
    assert resent == []
    assert r.zscore(LEDGER_SEEN, handle.id) == clock.now  # seen alive, held by a worker


def test_a_sweep_of_a_deep_old_queue_reads_only_its_old_end(private_redis):
    """5,000 tasks, all past the grace, all still queued: a sweep takes the 1,000 longest
    unseen and finds them at the list's oldest end without reading the rest."""
    r = private_redis.client()
    ledger = Ledger(r)
    t0 = time.time() - 3600
    entries = [LedgerEntry(f"t{i}", "vlmq", {}, None, None, t0 + i) for i in range(5000)]
    ledger.add(entries)
    messages = [json.dumps({"headers": {"id": e.task_id}}) for e in entries]
    for start in range(0, 5000, 1000):  # LPUSH, oldest first, as producers do
        r.lpush("vlmq", *messages[start : start + 1000])
    resent: list[LedgerEntry] = []
    sweeper = Sweeper(r, resent.append, grace_s=60, interval_s=1)
    r.config_resetstat()
    report = sweeper.sweep()
    assert (report.examined, report.alive, report.resent) == (BATCH, BATCH, 0)
    stats = r.info("commandstats")
    assert stats["cmdstat_lrange"]["calls"] <= 3  # 500 + 400 + 400 elements from the old end
    assert resent == []
    r.close()


def test_one_sweeper_at_a_time(r: redis.Redis) -> None:
    first = Sweeper(r, lambda e: None, grace_s=60, interval_s=1)
    second = Sweeper(r, lambda e: None, grace_s=60, interval_s=1)
    assert first._hold_lock()
    assert not second._hold_lock()
    assert first._hold_lock()  # kept, its expiry pushed back
    first.stop()
    assert second._hold_lock()
    second.stop()


def test_a_task_waiting_past_the_grace_keeps_its_image(client: Client, r: redis.Redis):
    [handle] = client.submit_many([(png(1), "Still waiting?")])
    image_key = json.loads(r.hget(LEDGER_ENTRIES, handle.id))["kwargs"]["image_key"]
    r.expire(image_key, 100)  # as if it had waited most of its TTL in a long queue
    clock = Clock()
    store = ImageStore(r, ttl_s=3600)
    sweeper = Sweeper(
        r, lambda e: None, grace_s=grace_s(VISIBILITY_S), interval_s=1,
        keep_images=store.keep, clock=clock,
    )  # fmt: skip
    clock.now += grace_s(VISIBILITY_S) + 1
    assert sweeper.sweep().alive == 1  # still in its queue
    assert r.ttl(image_key) > 3000
