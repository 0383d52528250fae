"""Poison requests: one that breaks the model every time fails alone with ``ModelError``; one
that kills the worker every time fails after ``VLMQ_MAX_ATTEMPTS`` deliveries. Either way the
requests batched with it get their answers."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from reliability_support import image, wait_for

from producer.client import Client
from producer.config import Settings
from producer.errors import ModelError

pytestmark = pytest.mark.integration

# A question holding a lone UTF-16 surrogate (as a client that cut an emoji in half sends):
# valid JSON, but the tokenizer cannot encode it and refuses the whole batch, every time. A
# genuine input, not a test hook. (Special-token text such as <|image|> is refused upfront.)
POISON_QUESTION = "Compare this \ud83d with that one."


@pytest.mark.parametrize("engine", ["batch", "continuous"])
def test_request_that_breaks_the_model_fails_alone(
    private_redis, result_writes, start_worker, engine
):
    url = private_redis.url()
    worker = start_worker(
        REDIS_URL=url, VLMQ_ENGINE=engine, VLMQ_MAX_BATCH_SIZE="8", VLMQ_MAX_WAIT_MS="1000"
    )
    client = Client(Settings(redis_url=url))
    items = [{"image": image(i), "question": f"Good {i}?", "max_new_tokens": 4} for i in range(7)]
    items.insert(3, {"image": image(99), "question": POISON_QUESTION, "max_new_tokens": 4})
    handles = client.submit_many(items)
    poison = handles.pop(3)

    with pytest.raises(ModelError, match="the model failed on this request"):
        poison.result(timeout=60)
    results = [h.result(timeout=60) for h in handles]
    assert all(res.answer_tokens >= 1 for res in results)
    if engine == "batch":  # batched with the poison, then retried in halves without it
        assert "Batch of 8 failed" in worker.log()
        assert max(res.timings.batch_size for res in results) < 8
    counts = result_writes.settled([h.id for h in [*handles, poison]])
    assert all(counts[h.id] == 1 for h in [*handles, poison])
    assert int(private_redis.client().get(f"vlmq:attempts:{poison.id}")) == 1
    assert worker.alive()


VISIBILITY_S = 15
MAX_ATTEMPTS = 2


def test_request_that_kills_the_worker_gives_up_after_max_attempts(
    private_redis, result_writes, start_worker, forced_length_model_dir
):
    """The worker process dies whenever the poison request reaches the model (the test kills
    it then, as a segfault or an OOM kill would); a new worker is started each time."""
    url = private_redis.url()
    env = {
        "REDIS_URL": url,
        # Every answer runs its full length, so the test sees each run of the poison in time
        # (a sampled end of turn after a few tokens could end one before the test looked).
        "VLMQ_MODEL": str(forced_length_model_dir),
        "VLMQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "VLMQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "VLMQ_MAX_BATCH_SIZE": "8",
        "VLMQ_MAX_WAIT_MS": "500",
        "VLMQ_MAX_NEW_TOKENS": "512",
    }
    client = Client(Settings(redis_url=url, visibility_timeout_s=VISIBILITY_S))
    r = private_redis.client()
    worker = start_worker(**env)
    long = {"max_new_tokens": 100, "temperature": 1.0}
    items = [{"image": image(i), "question": f"Good {i}?", **long} for i in range(7)]
    # ~0.3 s in the model even alone: ample time for the test to see it there.
    fatal = {"image": image(99), "question": "A fatal question?", "max_new_tokens": 400}
    items.insert(2, fatal)
    handles = client.submit_many(items)
    poison = handles.pop(2)
    attempts_key = f"vlmq:attempts:{poison.id}"

    kills = seen = 0
    while True:
        entered = threading.Event()

        def poison_reached_model(seen: int = seen, entered: threading.Event = entered) -> bool:
            done = poison.id in result_writes.counts()
            attempts = int(r.get(attempts_key) or 0)
            # Past VLMQ_MAX_ATTEMPTS the worker gives up instead of running it.
            if seen < attempts <= MAX_ATTEMPTS and not done:
                entered.set()
            return done or entered.is_set()

        wait_for(poison_reached_model, 90, "poison neither ran nor finished", poll_s=0.005)
        if not entered.is_set():
            break
        worker.stop(signal.SIGKILL)
        seen = int(r.get(attempts_key))
        kills += 1
        assert kills <= MAX_ATTEMPTS, "the poison ran more often than VLMQ_MAX_ATTEMPTS"
        time.sleep(VISIBILITY_S + 1)  # its messages come back after the visibility timeout
        worker = start_worker(**env)

    with pytest.raises(ModelError, match=f"gave up after {MAX_ATTEMPTS} attempts"):
        poison.result(timeout=30)
    assert kills == MAX_ATTEMPTS
    results = [h.result(timeout=120) for h in handles]
    assert all(res.answer_tokens >= 1 for res in results)
    counts = result_writes.settled([h.id for h in [*handles, poison]])
    assert all(counts[h.id] == 1 for h in [*handles, poison])
