"""A message lost in a worker's fetch window — popped with BRPOP, the worker killed before kombu
records it as unacked — is sent again by the sweeper and answered once; tasks still waiting or
held past the grace are left alone."""

from __future__ import annotations

import json
import time

import pytest
from reliability_support import image, unacked_count, wait_for

from producer.client import Client
from producer.config import Settings
from producer.keys import LEDGER_RESENT, LEDGER_SEEN
from producer.ledger import Ledger
from producer.queues import priority_lists
from worker.sweeper import grace_s, task_id_of

pytestmark = pytest.mark.integration

VISIBILITY_S = 5
WORKER_ENV = {
    "VLMQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "VLMQ_SWEEP_INTERVAL_S": "1",
    "VLMQ_MAX_BATCH_SIZE": "4",
    "VLMQ_MAX_NEW_TOKENS": "32",
}
UNSERVED = "nobody.fp32"  # a model no worker here serves: its queue keeps its tasks


def test_message_lost_in_the_fetch_window_is_sent_again_and_answered_once(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    settings = Settings(redis_url=url, visibility_timeout_s=VISIBILITY_S)
    client = Client(settings)
    r = private_redis.client()
    handles = client.submit_many(
        {"image": image(i), "question": f"Task {i}?", "max_new_tokens": 4} for i in range(8)
    )
    waiting = client.submit_many(
        {"image": image(50 + i), "question": "Anyone?", "model": UNSERVED} for i in range(2)
    )
    ids = [h.id for h in handles]

    # A worker pops the oldest message and dies before recording it as unacked: gone.
    lost = task_id_of(r.rpop(settings.queue))
    assert lost == ids[0]
    # Another worker pops the next one and records it as unacked, then keeps it (a long run
    # here: its visibility deadline is an hour away, so kombu does not restore it).
    raw = r.rpop(settings.queue)
    held = task_id_of(raw)
    r.zadd("unacked_index", {"held-tag": time.time() + 3600})
    r.hset("unacked", "held-tag", json.dumps([json.loads(raw), settings.queue, settings.queue]))
    submitted = time.time()

    start_worker(REDIS_URL=url, **WORKER_ENV)
    answered = [h for h in handles if h.id != held]
    results = [h.result(timeout=grace_s(VISIBILITY_S) + 60) for h in answered]
    assert all(res.answer_tokens >= 1 for res in results)
    assert time.time() - submitted >= grace_s(VISIBILITY_S) - 1  # the lost one waited it out
    counts = result_writes.settled([h.id for h in answered])
    assert {h.id: counts[h.id] for h in answered} == {h.id: 1 for h in answered}
    assert int(r.get(LEDGER_RESENT)) == 1

    # The waiting and the held tasks were looked at past the grace, found alive, and left:
    # no copy in any list, no result, their ledger entries kept (and marked seen).
    ledger = Ledger(r)
    alive = [held, *(h.id for h in waiting)]
    wait_for(
        lambda: all(
            r.zscore(LEDGER_SEEN, i) > submitted + grace_s(VISIBILITY_S) - 1 for i in alive
        ),
        10,
        "the sweeper did not look at the waiting and held tasks",
    )
    queued = [
        task_id_of(raw)
        for queue in (settings.queue, f"{settings.queue}.{UNSERVED}")
        for name in priority_lists(queue)
        for raw in r.lrange(name, 0, -1)
    ]
    assert sorted(queued) == sorted(h.id for h in waiting)
    wait_for(lambda: unacked_count(r) == 1, 10, "the worker left messages unacked")
    assert task_id_of(r.hget("unacked", "held-tag")) == held
    assert all(i in ledger for i in alive) and len(ledger) == len(alive)
    assert not any(result_writes.counts()[i] for i in alive)
    assert int(r.get(LEDGER_RESENT)) == 1
