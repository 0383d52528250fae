"""asyncio and revoke against a real worker: ``Client.asubmit``, ``TaskHandle.aresult``,
``TaskHandle.revoke``."""

import asyncio
import time

import pytest
from PIL import Image

from producer import Client, Settings, TaskRevoked
from producer.queues import queue_depth

pytestmark = pytest.mark.integration


def test_asubmit_aresult_and_a_revoke_the_worker_honours(start_worker, redis_url: str):
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    revoked = client.submit(Image.new("RGB", (32, 32), "red"), "Never run?")
    revoked.revoke()  # before any worker runs: it must never be computed
    with pytest.raises(TaskRevoked):
        revoked.result(timeout=5)
    worker = start_worker()

    async def main():
        images = [Image.new("RGB", (40, 30), (i * 30, 90, 20)) for i in range(6)]
        submits = [client.asubmit(img, f"What is {i}?", max_new_tokens=3)
                   for i, img in enumerate(images)]  # fmt: skip
        handles = await asyncio.gather(*submits)
        results = await asyncio.gather(*(h.aresult(timeout=60) for h in handles))
        with pytest.raises(TaskRevoked):
            await revoked.aresult(timeout=5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.handle("no-such-task").aresult(timeout=0.3)
        assert time.monotonic() - started < 2
        return handles, results

    handles, results = asyncio.run(main())
    assert [r.task_id for r in results] == [h.id for h in handles]
    assert all(r.answer_tokens >= 1 and r.timings.batch_size >= 1 for r in results)
    # The revoked task's message was taken and acked, unrun; its outcome stays REVOKED.
    assert queue_depth(client._redis, "vlmq") == 0
    assert revoked.state == "REVOKED"
    assert f"Task {revoked.id} already has a result" in worker.log()
    client.close()
