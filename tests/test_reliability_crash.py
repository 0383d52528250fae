"""A worker killed with SIGKILL in the middle of a batch: every task still completes once the
next worker starts, and every result is written exactly once (at-least-once delivery,
exactly-once results)."""

from __future__ import annotations

import signal
import time

import pytest
from reliability_support import image, unacked_count, unacked_task_ids, wait_for

from producer.claimcheck import ImageStore
from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.images import read_image_source
from producer.protocol import TASK_NAME, AnalysisRequest, Limits

pytestmark = pytest.mark.integration

VISIBILITY_S = 15
WORKER_ENV = {
    "VLMQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "VLMQ_MAX_BATCH_SIZE": "8",
    "VLMQ_MAX_WAIT_MS": "50",
    "VLMQ_MAX_NEW_TOKENS": "128",
}


def test_sigkill_mid_batch_loses_nothing_and_writes_each_result_once(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    settings = Settings(redis_url=url, visibility_timeout_s=VISIBILITY_S)
    client = Client(settings)
    worker = start_worker(REDIS_URL=url, **WORKER_ENV)
    handles = client.submit_many(
        {"image": image(i), "question": f"Task {i}?", "max_new_tokens": 100, "temperature": 1.0}
        for i in range(32)
    )
    ids = [h.id for h in handles]
    r = private_redis.client()

    def mid_batch() -> bool:
        # Every message is taken (the queue is empty) and recorded as unacked, and some task
        # has reached the model (its attempt is counted) but has no result yet: a batch is
        # running. A kill while the worker is still fetching could lose the message in flight
        # (kombu pops with BRPOP, then records it as unacked) until the sweeper sends it
        # again, a grace later: test_reliability_fetch_window.py covers that.
        done = set(result_writes.counts())
        running = [i for i in ids if i not in done and r.exists(f"vlmq:attempts:{i}")]
        return (
            r.llen(settings.queue) == 0
            and len(done) >= 8
            and bool(running)
            and set(ids) - done <= unacked_task_ids(r)
        )

    wait_for(mid_batch, 60, "no batch was seen running after the queue was drained", 0.01)
    worker.stop(signal.SIGKILL)
    done = {i for i in ids if r.exists(f"celery-task-meta-{i}")}  # the stored results
    killed_in_batch = [i for i in ids if i not in done and r.exists(f"vlmq:attempts:{i}")]
    assert killed_in_batch, "the kill came after the batch had finished"
    # Everything without a result waits in Redis, unacked (with, perhaps, a task whose result
    # was stored just before the kill and its ack not yet sent: it comes back and is acked).
    without_result = set(ids) - done
    assert without_result and without_result <= unacked_task_ids(r)

    # The dead worker's messages come back once the visibility timeout has passed; the next
    # worker restores them when it starts polling.
    time.sleep(VISIBILITY_S + 1)
    start_worker(REDIS_URL=url, **WORKER_ENV)
    results = [h.result(timeout=120) for h in handles]
    assert all(res.answer_tokens >= 1 for res in results)
    counts = result_writes.settled(ids)
    assert {i: counts[i] for i in ids} == dict.fromkeys(ids, 1)
    for task_id in killed_in_batch:
        assert int(r.get(f"vlmq:attempts:{task_id}")) == 2
    wait_for(lambda: unacked_count(r) == 0, 10, "messages still unacked after every result")
    print(f"\n{len(ids)} tasks, {len(killed_in_batch)} in the killed batch, all written once")


def test_redelivered_task_with_a_result_is_acked_without_running(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    settings = Settings(redis_url=url)
    client = Client(settings)
    worker = start_worker(REDIS_URL=url)
    handle = client.submit(image(1), "What is it?", max_new_tokens=4)
    first = handle.result(timeout=60)
    r = private_redis.client()
    assert int(r.get(f"vlmq:attempts:{handle.id}")) == 1

    # A second delivery of the same task id, as Redis makes after a visibility timeout.
    message = handle._async.backend.get_task_meta(handle.id)["kwargs"]
    make_celery_app(settings).send_task(
        TASK_NAME, kwargs=message, task_id=handle.id, queue=settings.queue
    )
    wait_for(
        lambda: "already has a result" in worker.log(), 30, "the redelivery was not recognised"
    )
    wait_for(lambda: unacked_count(r) == 0 and r.llen(settings.queue) == 0, 10, "not acked")
    assert result_writes.settled([handle.id])[handle.id] == 1
    assert int(r.get(f"vlmq:attempts:{handle.id}")) == 1  # never reached the model again
    assert handle.result(timeout=1) == first


@pytest.mark.parametrize("engine", ["continuous", "batch"])
def test_task_delivered_again_while_it_runs_is_computed_and_written_once(
    private_redis, result_writes, start_worker, forced_length_model_dir, engine
):
    """A message that comes back while its task still runs in the same worker (kombu restores
    unacked messages on a reconnect) waits for the first delivery's outcome."""
    url = private_redis.url()
    settings = Settings(redis_url=url)
    # The batch wait holds the first delivery until the second arrives (a loaded CPU once
    # took 300 ms between the two sends), and a forced 200-token answer keeps it running.
    worker = start_worker(
        REDIS_URL=url,
        VLMQ_MODEL=str(forced_length_model_dir),
        VLMQ_ENGINE=engine,
        VLMQ_MAX_WAIT_MS="2000",
        VLMQ_MAX_NEW_TOKENS="256",
    )
    data = read_image_source(image(1), limits=Limits())
    request = AnalysisRequest(
        image_key=ImageStore.key_for(data), question="Twice?", max_new_tokens=200, temperature=1.0
    )
    handle = Client(settings).submit(data, "Twice?", max_new_tokens=200, temperature=1.0)
    make_celery_app(settings).send_task(
        TASK_NAME, kwargs=request.to_message(), task_id=handle.id, queue=settings.queue
    )
    assert handle.result(timeout=60).answer_tokens == 200
    r = private_redis.client()
    wait_for(lambda: unacked_count(r) == 0 and r.llen(settings.queue) == 0, 30, "not all acked")
    assert result_writes.settled([handle.id])[handle.id] == 1
    assert result_writes.states(handle.id) == ["SUCCESS"]
    assert int(r.get(f"vlmq:attempts:{handle.id}")) == 1
    assert "already running here" in worker.log()
