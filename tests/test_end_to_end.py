"""The whole path on a real Redis through a real ``celery -A worker.app worker`` process."""

import io
import math
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
from PIL import Image

from producer.claimcheck import ImageStore
from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.errors import ImageUnavailable, InvalidImage, InvalidRequest, VlmqError
from producer.protocol import TASK_NAME, AnalysisRequest

pytestmark = pytest.mark.integration


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims a huge image; its data is never needed to refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def good_image(i: int) -> Image.Image:
    modes = ["RGB", "L", "CMYK", "RGBA", "P"]
    img = Image.new("RGB", (64 + 7 * (i % 20), 48 + 5 * (i % 13)), (i * 37 % 256, 90, 200))
    return img.convert(modes[i % len(modes)])


def malformed_messages(store: ImageStore, good_key: str) -> list[tuple[dict, type[VlmqError]]]:
    """Twenty messages a hostile or buggy producer could send, each with its named error."""
    base = {
        "image_key": good_key,
        "question": "What is this?",
        "max_new_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "submitted_at": time.time(),
        "model": None,
    }
    truncated = png(Image.new("RGB", (64, 64), "red"))[:60]
    return [
        ({**base, "image_key": store.put(b"this is not an image")}, InvalidImage),
        ({**base, "image_key": store.put(b"")}, InvalidImage),
        ({**base, "image_key": store.put(truncated)}, InvalidImage),
        ({**base, "image_key": store.put(bomb_png())}, InvalidImage),
        ({**base, "image_key": store.put(b"<html><body>hi</body></html>")}, InvalidImage),
        ({**base, "image_key": store.put(bytes(range(256)) * 8)}, InvalidImage),
        ({**base, "image_key": "vlmq:image:" + "0" * 64}, ImageUnavailable),
        ({**base, "question": ""}, InvalidRequest),
        ({**base, "question": "   "}, InvalidRequest),
        ({**base, "question": "why? " * 5000}, InvalidRequest),
        ({**base, "question": ["a", "list"]}, InvalidRequest),
        ({k: v for k, v in base.items() if k != "question"}, InvalidRequest),
        ({**base, "max_new_tokens": 0}, InvalidRequest),
        ({**base, "max_new_tokens": 10**6}, InvalidRequest),
        ({**base, "max_new_tokens": True}, InvalidRequest),
        ({**base, "temperature": -1.0}, InvalidRequest),
        ({**base, "temperature": math.inf}, InvalidRequest),
        ({**base, "top_p": 0.0}, InvalidRequest),
        ({**base, "image_key": 12345}, InvalidRequest),
        ({**base, "unexpected": "field"}, InvalidRequest),
    ]


def test_two_hundred_tasks_twenty_malformed(start_worker, redis_url):
    worker = start_worker(VLMQ_MAX_BATCH_SIZE="16", VLMQ_MAX_WAIT_MS="200")
    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)
    app = make_celery_app(settings)
    store = ImageStore(redis.Redis.from_url(redis_url), ttl_s=600)
    good_key = store.put(png(good_image(0)))
    bad = malformed_messages(store, good_key)
    assert len(bad) == 20

    def submit_good(i: int):
        return client.submit(
            good_image(i), f"Question {i}: what is shown?", max_new_tokens=3 + i % 5
        )

    def submit_bad(i: int):
        kwargs, _ = bad[i]
        return app.send_task(TASK_NAME, kwargs=kwargs, queue=settings.queue)

    with ThreadPoolExecutor(8) as pool:
        good = list(pool.map(submit_good, range(180)))
        malformed = list(pool.map(submit_bad, range(20)))

    results = [h.result(timeout=180) for h in good]
    assert len(results) == 180
    assert all(r.answer_tokens >= 1 and r.prompt_tokens > 0 for r in results)
    assert max(r.timings.batch_size for r in results) > 1
    for i, r in enumerate(results):
        assert r.answer_tokens <= 3 + i % 5

    for (_, expected), async_result in zip(bad, malformed, strict=True):
        with pytest.raises(expected) as info:
            async_result.get(timeout=60, propagate=True)
        assert str(info.value)
    assert worker.alive()
    assert app.control.ping(timeout=2)


def test_revoked_and_expired_tasks_never_reach_the_model(start_worker, redis_url):
    # A long batch wait keeps tasks buffered long enough for the revoke to land first.
    start_worker(VLMQ_MAX_WAIT_MS="5000")
    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)
    expired = client.submit(
        good_image(1), "Too late?", expires=datetime.now(UTC) - timedelta(seconds=1)
    )
    revoked = client.submit(good_image(2), "Cancelled?")
    make_celery_app(settings).control.revoke(revoked.id)
    live = client.submit(good_image(3), "Still here?", max_new_tokens=2)
    assert live.result(timeout=60).answer_tokens >= 1
    assert live.result(timeout=1).timings.batch_size == 1
    for handle in (expired, revoked):
        deadline = time.monotonic() + 30
        while handle.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert handle.state == "REVOKED"


def test_countdown_task_waits_for_its_eta(start_worker, redis_url):
    start_worker()
    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)
    key = ImageStore(redis.Redis.from_url(redis_url)).put(png(good_image(4)))
    kwargs = AnalysisRequest(image_key=key, question="Later?", max_new_tokens=2).to_message()
    t0 = time.monotonic()
    later = make_celery_app(settings).send_task(TASK_NAME, kwargs=kwargs, countdown=5)
    now = client.submit(good_image(5), "Now?", max_new_tokens=2)
    assert now.result(timeout=60).answer_tokens >= 1
    assert not client.handle(later.id).ready()
    assert client.handle(later.id).result(timeout=60).answer_tokens >= 1
    assert time.monotonic() - t0 >= 5
