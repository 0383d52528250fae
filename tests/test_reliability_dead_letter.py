"""Poison broker entries are quarantined, never fatal: a body that is not Celery's triple, bytes
that are not JSON, and thousands of generated entries pushed straight into the queue lists
while a real worker serves valid tasks. The worker stays up, every valid task is answered once,
and every bad entry is in ``vlmq.dead`` or failed with a named error."""

from __future__ import annotations

import base64
import json
import random
import time
import urllib.request
import uuid
from collections import Counter
from typing import Any

import pytest
from reliability_support import free_port, image, unacked_count, wait_for

from producer import errors
from producer.client import Client
from producer.config import Settings
from producer.deadletter import MAX_RAW_BYTES, DeadLetters
from producer.errors import InvalidRequest
from producer.protocol import model_queue, served_model_id
from worker.quarantine import readable_task_id

pytestmark = pytest.mark.integration

PRIORITY_SEP = "\x06\x16"  # kombu's separator of a queue's priority lists


def real_entry(client: Client) -> dict[str, Any]:
    """The queue entry of a real task, taken off the queue before any worker runs it."""
    handle = client.submit(image(0), "What is this?", max_new_tokens=2)
    r = client._redis
    raw = r.rpop(client.settings.queue)
    assert raw is not None
    entry = json.loads(raw)
    assert entry["headers"]["id"] == handle.id
    return entry


def renamed(entry: dict[str, Any]) -> dict[str, Any]:
    """A copy with a fresh task id and delivery tag."""
    copy = json.loads(json.dumps(entry))
    copy["headers"]["id"] = str(uuid.uuid4())
    copy["properties"]["delivery_tag"] = str(uuid.uuid4())
    return copy


def with_body(entry: dict[str, Any], body: Any) -> dict[str, Any]:
    copy = renamed(entry)
    copy["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return copy


def encode(entry: Any) -> bytes:
    return json.dumps(entry).encode()


def scrape_dead_letters(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("vlmq_dead_letters_total"))
    return float(line.split()[-1])


def test_poison_body_and_non_json_entry_are_dead_lettered(private_redis, start_worker):
    url = private_redis.url()
    client = Client(Settings(redis_url=url))
    r = private_redis.client()
    template = real_entry(client)
    poison = with_body(template, {"a": 1})  # valid JSON, not [args, kwargs, embed]
    not_json = b"\x80\x81 this is not JSON {"
    queue = client.settings.queue
    r.lpush(queue, encode(poison), not_json)
    metrics_port = free_port()
    worker = start_worker(REDIS_URL=url, VLMQ_METRICS_PORT=str(metrics_port))

    with pytest.raises(InvalidRequest, match=r"dead-lettered: .*not Celery's"):
        client.handle(poison["headers"]["id"]).result(timeout=30)
    wait_for(lambda: DeadLetters(r).count() == 2, 30, "entries not dead-lettered")
    letters = {letter.raw: letter for letter in DeadLetters(r).list()}
    assert "not UTF-8 JSON" in letters[not_json].reason
    assert letters[not_json].queue == queue and letters[not_json].task_id is None
    assert letters[encode(poison)].task_id == poison["headers"]["id"]
    # The worker serves on: a valid task after the poison is answered.
    assert client.submit(image(1), "Still there?", max_new_tokens=2).result(timeout=60)
    wait_for(lambda: r.llen(queue) == 0 and unacked_count(r) == 0, 10, "messages left")
    assert scrape_dead_letters(metrics_port) == 2
    assert worker.alive()
    assert worker.log().count("Dead-lettered") == 2  # each logged once


# -- the transport-level fuzz ------------------------------------------------------------

FUZZ_ENTRIES = 5000
VALID_TASKS = 40


def wrong_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            -1,
            2**70,
            1.5e308,
            "",
            "x" * rng.choice([1, 300, 70_000]),
            [],
            [1, "a", None],
            {},
            {"a": {"b": [1]}},
            "\ud83d",
            "vlmq.analyze",
        ]
    )


def set_at(node: Any, path: list[Any], value: Any) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def fuzz_entry(template: dict[str, Any], rng: random.Random) -> bytes:
    """One generated entry: random bytes, a truncated or byte-mutated real message, a wrong
    type in a field of the envelope, the headers or the body, or a huge value."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        raw = encode(renamed(template))
        return raw[: rng.randrange(0, len(raw))]
    if kind == 2:
        raw = bytearray(encode(renamed(template)))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    entry = renamed(template)
    args, kwargs, embed = json.loads(base64.b64decode(entry["body"]))
    if kind == 3:  # the envelope
        paths = [["body"], ["headers"], ["properties"], ["content-type"], ["content-encoding"]]
        paths += [["properties", key] for key in entry["properties"]]
        paths += [["properties", "delivery_info", key] for key in ("exchange", "routing_key")]
        set_at(entry, rng.choice(paths), wrong_value(rng))
        return encode(entry if rng.random() < 0.9 else [entry])
    if kind == 4:  # the headers
        key = rng.choice([*entry["headers"], "compression", "stamps", "shadow"])
        entry["headers"][key] = wrong_value(rng)
        return encode(entry)
    if kind == 5:  # the body's parts
        body: Any = [args, kwargs, embed]
        choice = rng.randrange(4)
        if choice == 0:
            body = wrong_value(rng)
        elif choice == 1:
            body[rng.randrange(3)] = wrong_value(rng)
        elif choice == 2:
            body.append(wrong_value(rng))
        else:
            body[1][rng.choice(list(kwargs))] = wrong_value(rng)
        entry["body"] = base64.b64encode(json.dumps(body).encode()).decode()
        return encode(entry)
    # huge values: a question, a header or a whole entry far over every limit
    target = rng.randrange(3)
    if target == 0:
        kwargs["question"] = "?" * 200_000
        entry["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
    elif target == 1:
        entry["headers"]["argsrepr"] = "a" * 100_000
    else:
        entry["headers"]["id"] = "i" * 10_000
    return encode(entry)


def expected_task_id(raw: bytes) -> str | None:
    """The task id a result would be stored under, if the entry carries a usable one."""
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return readable_task_id(entry.get("headers")) if isinstance(entry, dict) else None


def test_transport_fuzz_worker_stays_up_and_every_entry_is_accounted_for(
    private_redis, result_writes, start_worker, tiny_model_dir
):
    url = private_redis.url()
    client = Client(Settings(redis_url=url))
    r = private_redis.client()
    template = real_entry(client)
    # Entries a mutation left valid then end in ImageUnavailable, a named error, without the
    # model's time (the valid tasks below run on the model).
    _, kwargs, _ = json.loads(base64.b64decode(template["body"]))
    r.delete(kwargs["image_key"])
    queue = client.settings.queue
    worker = start_worker(REDIS_URL=url, VLMQ_MAX_BATCH_SIZE="8", VLMQ_MAX_WAIT_MS="20")
    model = model_queue(queue, served_model_id(str(tiny_model_dir), "fp32"))
    lists = [queue, model, f"{queue}{PRIORITY_SEP}3", f"{model}{PRIORITY_SEP}9"]
    rng = random.Random(15)
    entries = [fuzz_entry(template, rng) for _ in range(FUZZ_ENTRIES)]
    assert len(set(entries)) > FUZZ_ENTRIES * 0.95

    t0 = time.monotonic()
    valid = []
    for start in range(0, FUZZ_ENTRIES, 500):
        for raw in entries[start : start + 500]:
            r.lpush(rng.choice(lists), raw)
        valid += client.submit_many(
            {"image": image(1000 + i), "question": f"Valid {i}?", "max_new_tokens": 3}
            for i in range(len(valid), len(valid) + VALID_TASKS // 10)
        )
    results = [h.result(timeout=120) for h in valid]
    assert all(res.answer_tokens >= 1 for res in results)

    def drained() -> bool:
        return all(r.llen(name) == 0 for name in lists) and unacked_count(r) == 0

    wait_for(drained, 120, "entries left in the queues")
    counts = result_writes.settled([h.id for h in valid])
    assert all(counts[h.id] == 1 for h in valid), "a valid task was answered twice"

    dead = Counter(letter.raw for letter in DeadLetters(r).list())
    unaccounted = []
    outcomes: Counter[str] = Counter()
    for raw in entries:
        if dead[raw[:MAX_RAW_BYTES]]:
            dead[raw[:MAX_RAW_BYTES]] -= 1
            outcomes["dead-lettered"] += 1
            continue
        task_id = expected_task_id(raw)
        meta = client.app.backend.get_task_meta(task_id) if task_id else {}
        status = meta.get("status")
        if status == "FAILURE":
            exc_type = type(meta["result"]).__name__
            assert exc_type in NAMED_ERRORS, f"{task_id} failed with {exc_type}"
            outcomes[f"failed {exc_type}"] += 1
        elif status in ("SUCCESS", "REVOKED"):
            outcomes[status.lower()] += 1  # a mutation that left a valid (or expired) task
        else:
            unaccounted.append(raw[:2000])
    assert not unaccounted, f"{len(unaccounted)} entries unaccounted for, e.g. {unaccounted[:3]}"
    assert outcomes["dead-lettered"] > FUZZ_ENTRIES // 2
    assert worker.alive()
    print(
        f"\n{FUZZ_ENTRIES} fuzz entries and {len(valid)} valid tasks in "
        f"{time.monotonic() - t0:.1f} s: {dict(outcomes)}"
    )


# Every error a task may end with: the named errors of producer.errors.
NAMED_ERRORS = {
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.VlmqError)
}
