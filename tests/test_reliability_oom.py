"""Out of memory in a batch: the batch is split and retried, and no task is lost.

A real allocation failure, not a simulated one: once the worker is warm, its address space is
capped (``prlimit``) a little above what it uses, so a batch of long prompts (eager attention
holds prompt² scores per request) cannot get its memory while smaller batches still can.
On a GPU the same path handles ``torch.OutOfMemoryError``.
"""

from __future__ import annotations

import resource

import pytest
from reliability_support import image

from producer.client import Client
from producer.config import Settings

pytestmark = pytest.mark.integration

# Eager attention needs about 150 MB per such prompt: a batch of 8 (over 1.2 GB) cannot fit,
# a batch of 1 or 2 can.
HEADROOM = 700 * 1024 * 1024
LONG_QUESTION = "describe every detail " * 180  # about 1,800 prompt tokens on the tiny model


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_batch_out_of_memory_is_split_and_every_task_answered(
    private_redis, result_writes, start_worker
):
    url = private_redis.url()
    worker = start_worker(
        REDIS_URL=url,
        VLMQ_ENGINE="batch",
        VLMQ_ATTN="eager",
        VLMQ_MAX_BATCH_SIZE="8",
        VLMQ_MAX_WAIT_MS="1000",
        MALLOC_ARENA_MAX="2",  # no new 64 MB arena reservations to eat the headroom
    )
    client = Client(Settings(redis_url=url))
    client.submit(image(99), "Warm every thread up?", max_new_tokens=2).result(timeout=60)
    limit = vm_size(worker.proc.pid) + HEADROOM
    resource.prlimit(worker.proc.pid, resource.RLIMIT_AS, (limit, limit))

    handles = client.submit_many(
        {"image": image(i), "question": f"{i}: {LONG_QUESTION}", "max_new_tokens": 2}
        for i in range(8)
    )
    results = [h.result(timeout=120) for h in handles]
    log = worker.log()
    assert "Batch of 8 failed" in log, log[-3000:]
    assert "allocate" in log  # the allocator's own out-of-memory message
    assert all(res.answer_tokens >= 1 for res in results)
    assert max(res.timings.batch_size for res in results) < 8
    counts = result_writes.settled([h.id for h in handles])
    assert all(counts[h.id] == 1 for h in handles)
    assert worker.alive()
