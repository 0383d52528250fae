"""Security promises on real processes: only JSON from the broker, Redis with a password and
over TLS, no secret in the logs, Flower behind auth."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from reliability_support import ROOT, RedisServer, image, make_tls_files, unacked_count, wait_for

from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.protocol import TASK_NAME, AnalysisRequest

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55word-do-not-log"


class Exploit:
    """Unpickling this runs a command: it must never be unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_message_is_refused_and_never_unpickled(private_redis, start_worker, tmp_path):
    url = private_redis.url()
    worker = start_worker(REDIS_URL=url)
    settings = Settings(redis_url=url)
    marker = tmp_path / "pwned"
    kwargs = {**AnalysisRequest(image_key="vlmq:image:" + "0" * 64, question="Hi?").to_message()}
    kwargs["question"] = Exploit(str(marker))
    make_celery_app(settings).send_task(
        TASK_NAME, kwargs=kwargs, queue=settings.queue, serializer="pickle"
    )
    wait_for(lambda: "untrusted content of type pickle" in worker.log(), 30, worker.log()[-2000:])
    r = private_redis.client()
    wait_for(lambda: r.llen(settings.queue) == 0 and unacked_count(r) == 0, 10, "not dropped")
    assert not marker.exists(), "the worker unpickled a message"
    # The worker goes on serving JSON tasks.
    handle = Client(settings).submit(image(1), "Still fine?", max_new_tokens=2)
    assert handle.result(timeout=60).answer_tokens >= 1
    assert worker.alive()


def run_one_task(server: RedisServer, start_worker) -> str:
    """Start a worker on ``server``, run a task through it, return the worker's log."""
    url = server.url()
    worker = start_worker(REDIS_URL=url)
    client = Client(Settings.from_env({"REDIS_URL": url}))
    assert client.submit(image(2), "Over a secured Redis?", max_new_tokens=2).result(timeout=60)
    client.close()
    assert PASSWORD not in repr(client.settings)
    return worker.log()


def test_password_protected_redis_works_and_the_password_is_never_logged(tmp_path, start_worker):
    server = RedisServer(tmp_path / "redis-auth", password=PASSWORD)
    server.start()
    try:
        log = run_one_task(server, start_worker)
    finally:
        server.stop()
    assert PASSWORD not in log
    assert re.search(r"redis://:\*+@127\.0\.0\.1", log)  # the banner shows it masked


def test_tls_redis_works_and_the_password_is_never_logged(tmp_path, start_worker):
    server = RedisServer(tmp_path / "redis-tls", password=PASSWORD, tls=make_tls_files(tmp_path))
    server.start()
    try:
        log = run_one_task(server, start_worker)
    finally:
        server.stop()
    assert PASSWORD not in log
    assert "rediss://" in log


def test_compose_puts_flower_behind_auth_and_on_localhost():
    flower = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["flower"]
    auth = str(flower["environment"]["FLOWER_BASIC_AUTH"])
    assert auth.startswith("${FLOWER_BASIC_AUTH:?"), "Flower must refuse to start without auth"
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])
