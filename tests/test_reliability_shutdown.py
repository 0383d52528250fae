"""Warm shutdown (SIGTERM) in the middle of a batch: the batch in flight finishes, its results
are stored and acked, the buffered messages go back to the queue at once, nothing is lost."""

from __future__ import annotations

import signal

import pytest
from reliability_support import image, unacked_count, wait_for

from producer.client import Client
from producer.config import Settings

pytestmark = pytest.mark.integration


def test_sigterm_mid_batch_finishes_the_batch_and_returns_the_rest(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    # The default visibility timeout (2 h): nothing here may wait for it.
    settings = Settings(redis_url=url)
    client = Client(settings)
    env = {"REDIS_URL": url, "VLMQ_MAX_BATCH_SIZE": "8", "VLMQ_MAX_WAIT_MS": "50"}
    worker = start_worker(**env)
    handles = client.submit_many(
        {"image": image(i), "question": f"Task {i}?", "max_new_tokens": 100, "temperature": 1.0}
        for i in range(40)
    )
    ids = [h.id for h in handles]
    r = private_redis.client()

    def running() -> list[str]:
        done = result_writes.counts()
        return [i for i in ids if i not in done and r.exists(f"vlmq:attempts:{i}")]

    wait_for(lambda: len(result_writes.counts()) >= 8 and running(), 60, "no batch running")
    in_flight = running()
    assert worker.stop(signal.SIGTERM) == 0, worker.log()

    result_writes.settled(in_flight)  # the requests inside the model finished
    done = result_writes.counts()
    assert unacked_count(r) == 0, "messages left unacked by a warm shutdown"
    queued = sum(r.llen(key) for key in r.keys(f"{settings.queue}*") if r.type(key) == b"list")
    assert len(done) + queued == len(ids), "a task is neither finished nor back in the queue"
    assert queued > 0

    start_worker(**env)
    results = [h.result(timeout=120) for h in handles]
    assert all(res.answer_tokens >= 1 for res in results)
    counts = result_writes.settled(ids)
    assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)
    assert all(int(r.get(f"vlmq:attempts:{i}")) == 1 for i in ids)  # nothing ran twice
    print(f"\n{len(in_flight)} finished during shutdown, {queued} returned to the queue")
