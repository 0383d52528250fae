"""Overload: a bounded queue (``QueueFull``, or waiting by option), deadlines that are honoured
without the model, and priorities."""

from __future__ import annotations

import threading
import time

import pytest
from reliability_support import image, wait_for

from producer.client import Client
from producer.config import Settings
from producer.errors import QueueFull, TaskExpired

pytestmark = pytest.mark.integration


def test_queue_full_is_a_named_error_and_the_queue_stops_growing(private_redis):
    client = Client(Settings(redis_url=private_redis.url(), max_queue_depth=5))
    for i in range(3):
        client.submit(image(i), "Low?", priority=9)
    client.submit_many([(image(3), "Normal?"), (image(4), "Normal?")])
    assert client.queue_depth() == 5  # every priority counts
    with pytest.raises(QueueFull, match="VLMQ_MAX_QUEUE_DEPTH=5"):
        client.submit(image(5), "One too many?", priority=0)
    with pytest.raises(QueueFull):
        client.submit_many([(image(6), "A?"), (image(7), "B?")])
    assert client.queue_depth() == 5  # nothing of a refused submission was sent


def test_max_queue_depth_comes_from_the_environment(private_redis):
    settings = Settings.from_env({"REDIS_URL": private_redis.url(), "VLMQ_MAX_QUEUE_DEPTH": "2"})
    assert settings.max_queue_depth == 2
    assert Settings.from_env({}).max_queue_depth == 0  # unlimited by default


def test_wait_when_full_waits_for_the_workers_to_make_room(private_redis, start_worker):
    url = private_redis.url()
    settings = Settings(redis_url=url, max_queue_depth=4)
    waiting = Client(settings, wait_when_full=120)
    queued = [Client(settings).submit(image(i), f"Queued {i}?", max_new_tokens=2) for i in range(4)]

    t0 = time.monotonic()
    with pytest.raises(QueueFull, match=r"after waiting 0\.5 s"):
        Client(settings, wait_when_full=0.5).submit(image(9), "Impatient?")
    assert 0.5 <= time.monotonic() - t0 < 5

    handles = []
    thread = threading.Thread(
        target=lambda: handles.append(waiting.submit(image(10), "Patient?", max_new_tokens=2))
    )
    thread.start()
    time.sleep(1.0)
    assert not handles, "submitted into a full queue"
    start_worker(REDIS_URL=url)
    thread.join(60)
    assert handles, "still waiting after the worker drained the queue"
    assert handles[0].result(timeout=60).answer_tokens >= 1
    assert all(h.result(timeout=60).answer_tokens >= 1 for h in queued)


def test_expired_tasks_fail_as_expired_without_reaching_the_model(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    client = Client(Settings(redis_url=url))
    doomed = [client.submit(image(i), f"Late {i}?", expires=1.0) for i in range(5)]
    timely = client.submit(image(50), "On time?", expires=300, max_new_tokens=2)
    time.sleep(1.5)  # no worker yet: the deadlines pass while the tasks wait in the queue
    worker = start_worker(REDIS_URL=url)

    assert timely.result(timeout=60).answer_tokens >= 1
    r = private_redis.client()
    for handle in doomed:
        with pytest.raises(TaskExpired, match="expired"):
            handle.result(timeout=30)
        assert handle.state == "REVOKED"
        assert not r.exists(f"vlmq:attempts:{handle.id}"), "an expired task reached the model"
        assert result_writes.settled([handle.id])[handle.id] == 1
    assert worker.alive()


def test_higher_priority_tasks_run_first(private_redis, result_writes, start_worker):
    url = private_redis.url()
    client = Client(Settings(redis_url=url))
    # Queued before any worker runs: low priority first, so FIFO order would run them first.
    low = [client.submit(image(i), f"Low {i}?", priority=9, max_new_tokens=2) for i in range(12)]
    high = [
        client.submit(image(100 + i), f"High {i}?", priority=0, max_new_tokens=2) for i in range(12)
    ]
    slots = 4
    start_worker(REDIS_URL=url, VLMQ_MAX_BATCH_SIZE=str(slots), VLMQ_MAX_WAIT_MS="50")
    for handle in [*high, *low]:
        handle.result(timeout=60)
    wait_for(lambda: len(result_writes.order()) >= 24, 10, "results not all seen")
    order = result_writes.order()
    last_high = max(order.index(h.id) for h in high)
    # A low one may take a slot the last high ones leave free, run in their step and be
    # stored before them (CI saw one); any more would have started before a waiting high one.
    overtaking = [h.id for h in low if order.index(h.id) < last_high]
    assert len(overtaking) < slots, f"low-priority tasks finished before high ones: {order}"
