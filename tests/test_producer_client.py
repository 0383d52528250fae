"""Client and TaskHandle against the real Redis (db 15), with no worker running."""

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from celery import states
from conftest import REDIS_TEST_URL
from PIL import Image

import producer
from producer import errors
from producer.claimcheck import ImageStore
from producer.client import RESULT_POLL_S, Client, TaskHandle
from producer.config import Settings
from producer.protocol import TASK_NAME, AnalysisRequest, Limits
from producer.results import AnalysisResult, CotStages, Timings

pytestmark = [
    pytest.mark.integration,
    # Celery's Redis backend stores results with setex, which redis-py deprecates.
    pytest.mark.filterwarnings("ignore:Call to deprecated setex"),
]

REDIS_URL = REDIS_TEST_URL  # the tests' own database (conftest)


def png(color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def client(r: redis.Redis) -> Iterator[Client]:
    c = Client(Settings(redis_url=REDIS_URL), limits=Limits())
    yield c
    c.close()


def queued(r: redis.Redis, key: str = "vlmq") -> list[dict]:
    """The messages waiting in a queue list, oldest first, with their body decoded."""
    messages = [json.loads(raw) for raw in reversed(r.lrange(key, 0, -1))]
    for message in messages:
        assert message["content-type"] == "application/json"
        message["body"] = json.loads(base64.b64decode(message["body"]))
    return messages


def test_submit_enqueues_a_json_message(client: Client, r: redis.Redis) -> None:
    before = time.time()
    handle = client.submit(png(), "What color?", max_new_tokens=32, temperature=0.5, top_p=0.9)
    [message] = queued(r)
    assert message["headers"]["task"] == TASK_NAME
    assert message["headers"]["id"] == handle.id
    args, kwargs, _ = message["body"]
    assert args == []
    request = AnalysisRequest.from_message(kwargs, Limits())
    assert request.image_key == ImageStore.key_for(png())
    assert (request.question, request.max_new_tokens) == ("What color?", 32)
    assert (request.temperature, request.top_p) == (0.5, 0.9)
    assert before <= request.submitted_at <= time.time()
    assert r.get(request.image_key) == png()
    assert 0 < r.ttl(request.image_key) <= 10800


def test_priority_and_expires(client: Client, r: redis.Redis) -> None:
    client.submit(png(), "Urgent?", priority=0)
    client.submit(png(), "Later?", priority=7, expires=60)
    [urgent] = queued(r, "vlmq")
    [later] = queued(r, "vlmq\x06\x167")
    assert urgent["properties"]["priority"] == 0
    assert later["properties"]["priority"] == 7
    assert later["headers"]["expires"] is not None
    assert len(r.keys("vlmq:image:*")) == 1


def test_given_image_store(r: redis.Redis) -> None:
    c = Client(Settings(redis_url=REDIS_URL), image_store=ImageStore(r, ttl_s=5))
    try:
        c.submit(png(), "Short-lived?")
    finally:
        c.close()
    assert 0 < r.ttl(ImageStore.key_for(png())) <= 5


def test_path_source(client: Client, r: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    path.write_bytes(png((0, 0, 255)))
    client.submit(path, "Which color?")
    assert r.exists(ImageStore.key_for(png((0, 0, 255))))


@pytest.mark.parametrize(
    ("image", "question", "options", "error"),
    [
        (b"not an image", "Why?", {}, errors.InvalidImage),
        (b"", "Why?", {}, errors.InvalidImage),
        ("/nonexistent/cat.png", "Why?", {}, errors.InvalidImage),
        ("http://127.0.0.1:1/cat.png", "Why?", {}, errors.ImageFetchError),
        (png(), "   ", {}, errors.InvalidRequest),
        (png(), "Why?", {"max_new_tokens": 0}, errors.InvalidRequest),
        (png(), "Why?", {"temperature": float("nan")}, errors.InvalidRequest),
        (png(), "Why?", {"priority": 10}, errors.InvalidRequest),
        (png(), "Why?", {"priority": True}, errors.InvalidRequest),
        (png(), "Why?", {"expires": "soon"}, errors.InvalidRequest),
    ],
)
def test_bad_input_fails_locally_and_sends_nothing(
    client: Client, r: redis.Redis, image: object, question: str, options: dict, error: type
) -> None:
    with pytest.raises(error):
        client.submit(image, question, **options)  # type: ignore[arg-type]
    assert r.keys("vlmq*") == []


def test_submit_many(client: Client, r: redis.Redis) -> None:
    handles = client.submit_many(
        [
            (png(), "First?"),
            {"image": png(), "question": "Second?", "max_new_tokens": 8},
            {"image": png((0, 255, 0)), "question": "Third?", "priority": 4},
        ]
    )
    assert len({h.id for h in handles}) == 3
    plain = queued(r, "vlmq")
    assert [m["headers"]["id"] for m in plain] == [h.id for h in handles[:2]]
    assert [m["body"][1]["question"] for m in plain] == ["First?", "Second?"]
    assert plain[1]["body"][1]["max_new_tokens"] == 8
    assert queued(r, "vlmq\x06\x164")[0]["headers"]["id"] == handles[2].id
    assert len(r.keys("vlmq:image:*")) == 2


@pytest.mark.parametrize(
    "bad",
    [
        (b"junk", "Why?"),
        {"image": png(), "question": ""},
        {"image": png(), "question": "Why?", "colour": "red"},
        {"question": "Why?"},
        (png(), "Why?", 5),
        "cat.png",
    ],
)
def test_submit_many_sends_nothing_when_one_item_is_bad(
    client: Client, r: redis.Redis, bad: object
) -> None:
    with pytest.raises(errors.InvalidRequest, match=r"^item 1: "):
        client.submit_many([(png(), "Fine?"), bad])  # type: ignore[list-item]
    assert r.keys("vlmq*") == []


def test_pending_handle(client: Client) -> None:
    handle = client.submit(png(), "Anyone there?")
    assert handle.state == states.PENDING
    assert not handle.ready()
    with pytest.raises(TimeoutError, match=handle.id):
        handle.result(timeout=0)


def stored_result(task_id: str) -> AnalysisResult:
    return AnalysisResult(
        task_id=task_id,
        answer="Red.",
        stages=CotStages(None, "A red square.", None, "Red."),
        prompt_tokens=20,
        answer_tokens=3,
        timings=Timings(queued_ms=5.0, batch_size=2, gpu_ms=30.0),
        model="tiny",
    )


def test_result_of_a_finished_task(client: Client) -> None:
    handle = client.submit(png(), "What color?")
    client.app.backend.store_result(handle.id, stored_result(handle.id).to_dict(), states.SUCCESS)
    assert handle.ready()
    assert handle.result(timeout=5) == stored_result(handle.id)
    other = Client(Settings(redis_url=REDIS_URL))
    try:
        assert other.handle(handle.id).result(timeout=5) == stored_result(handle.id)
    finally:
        other.close()


def test_a_result_whose_notification_is_missed_is_found_by_the_next_read(
    client: Client, r: redis.Redis
) -> None:
    handle = client.submit(png(), "What color?")
    backend = client.app.backend
    meta = backend.encode(
        {"status": states.SUCCESS, "result": stored_result(handle.id).to_dict(),
         "traceback": None, "children": [], "task_id": handle.id, "date_done": None}
    )  # fmt: skip

    def store_silently() -> None:
        time.sleep(0.5)  # while result() listens
        r.set(backend.get_key_for_task(handle.id), meta)  # a SET without its PUBLISH

    with ThreadPoolExecutor(1) as pool:
        pool.submit(store_silently)
        started = time.monotonic()
        assert handle.result(timeout=60) == stored_result(handle.id)
    assert time.monotonic() - started < RESULT_POLL_S + 2


@pytest.mark.parametrize(
    "error", [errors.InvalidImage, errors.ImageUnavailable, errors.ModelError, errors.QueueFull]
)
def test_named_failure_is_raised_again(client: Client, error: type) -> None:
    handle = client.submit(png(), "What color?")
    client.app.backend.mark_as_failure(handle.id, error("the worker says no"))
    assert handle.state == states.FAILURE
    with pytest.raises(error, match=r"^the worker says no$") as caught:
        handle.result(timeout=5)
    assert type(caught.value) is error


def test_failure_from_an_unimported_module_is_mapped_by_name(client: Client) -> None:
    handle = client.submit(png(), "What color?")
    failure = {"exc_type": "ImageUnavailable", "exc_module": "worker.gone", "exc_message": ["x"]}
    client.app.backend.store_result(handle.id, failure, states.FAILURE)
    with pytest.raises(errors.ImageUnavailable, match=r"^x$"):
        handle.result(timeout=5)


def test_other_failures_become_vlmq_error(client: Client) -> None:
    handle = client.submit(png(), "What color?")
    client.app.backend.mark_as_failure(handle.id, RuntimeError("CUDA error: out of memory"))
    with pytest.raises(errors.VlmqError, match="RuntimeError: CUDA error") as caught:
        handle.result(timeout=5)
    assert type(caught.value) is errors.VlmqError

    revoked = client.submit(png(), "What color?")
    client.app.backend.mark_as_revoked(revoked.id, reason="expired")
    with pytest.raises(errors.VlmqError, match="TaskRevokedError"):
        revoked.result(timeout=5)


def test_module_level_submit_uses_env(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("VLMQ_QUEUE", "elsewhere")
    monkeypatch.setattr(producer, "_default_client", None)
    handle = producer.submit(png(), "Module level?")
    [handle2] = producer.submit_many([(png(), "Again?")])
    assert isinstance(handle, TaskHandle)
    assert [m["headers"]["id"] for m in queued(r, "elsewhere")] == [handle.id, handle2.id]
    producer._default_client.close()


def test_many_threads_submitting_at_once_all_get_through(client: Client) -> None:
    # More threads than the client's Redis connections: they wait for one, none fails.
    image = png((0, 0, 255))
    with ThreadPoolExecutor(200) as pool:
        handles = list(pool.map(lambda i: client.submit(image, f"q{i}?"), range(200)))
    assert len({h.id for h in handles}) == 200
    assert client.queue_depth() == 200
