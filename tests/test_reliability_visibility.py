"""The Redis visibility timeout is checked at start-up against the longest a message can stay
unacked in the worker (a full batch timed after the warm-up), so a long generation is never
handed to a second worker while it still runs."""

from __future__ import annotations

import re

import pytest
from reliability_support import image, unacked_count, wait_for

from producer.client import Client
from producer.config import Settings

pytestmark = pytest.mark.integration

ENV = {"VLMQ_MAX_BATCH_SIZE": "4", "VLMQ_MAX_WAIT_MS": "50"}


@pytest.mark.parametrize("engine", ["batch", "continuous"])
def test_worker_refuses_a_visibility_timeout_below_its_longest_batch(
    private_redis, start_worker, engine
):
    with pytest.raises(AssertionError, match="exited") as refused:
        start_worker(
            REDIS_URL=private_redis.url(), VLMQ_ENGINE=engine, VLMQ_VISIBILITY_TIMEOUT_S="1", **ENV
        )
    message = str(refused.value)
    assert "ConfigurationError" in message or "VLMQ_VISIBILITY_TIMEOUT_S=1 is too short" in message
    assert re.search(r"Set VLMQ_VISIBILITY_TIMEOUT_S=\d+ or more", message), message[-2000:]


# The batch engine: each batch runs every request to the longest one, so batches are long.
LONG = {**ENV, "VLMQ_ENGINE": "batch", "VLMQ_MAX_NEW_TOKENS": "256"}


def test_long_generations_at_the_smallest_accepted_timeout_run_once(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    # What the worker asks for: in its refusal of 1 s, or, on a CPU fast enough that 1 s
    # covers its longest batch, in the log line of its acceptance.
    try:
        probe = start_worker(REDIS_URL=url, VLMQ_VISIBILITY_TIMEOUT_S="1", **LONG)
    except AssertionError as refused:
        wanted = re.search(r"Set VLMQ_VISIBILITY_TIMEOUT_S=(\d+) or more", str(refused))
        assert wanted, str(refused)[-2000:]
    else:
        wanted = re.search(r"unacked, about (\d+) s", probe.log())
        assert wanted, probe.log()[-2000:]
        probe.stop()
    # About the smallest timeout the worker accepts; two workers, so a message that
    # came back while still running would be taken and run again by the other one.
    visibility_s = 2 * max(int(wanted.group(1)), 1) + 2  # timings on a shared CPU vary
    env = {"REDIS_URL": url, "VLMQ_VISIBILITY_TIMEOUT_S": str(visibility_s), **LONG}
    workers = [start_worker(**env), start_worker(**env)]
    client = Client(Settings(redis_url=url, visibility_timeout_s=visibility_s))
    handles = client.submit_many(
        {"image": image(i), "question": f"Long {i}?", "max_new_tokens": 256, "temperature": 1.0}
        for i in range(24)
    )
    assert all(h.result(timeout=180).answer_tokens >= 1 for h in handles)
    r = private_redis.client()
    counts = result_writes.settled([h.id for h in handles])
    assert all(counts[h.id] == 1 for h in handles)
    assert all(int(r.get(f"vlmq:attempts:{h.id}")) == 1 for h in handles)  # none ran twice
    wait_for(lambda: unacked_count(r) == 0, 10, "messages left unacked")
    assert not any("already has a result" in w.log() for w in workers)
    print(f"\nvisibility timeout {visibility_s} s: {len(handles)} long generations, each ran once")
