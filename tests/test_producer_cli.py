"""The ``vlmq`` command line."""

import base64
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import states
from PIL import Image

from producer.cli import main
from producer.config import Settings, make_celery_app
from producer.errors import ModelError

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def r(monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.delenv("VLMQ_QUEUE", raising=False)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for name, color in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        path = tmp_path / name
        Image.new("RGB", (8, 8), color).save(path)
        paths.append(str(path))
    return paths


def queued_ids(r: redis.Redis, key: str = "vlmq") -> list[str]:
    """Ids of the tasks waiting in a queue list, oldest first."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(r.lrange(key, 0, -1))]


@pytest.mark.integration
def test_submit_prints_task_ids(r: redis.Redis, images: list[str], capsys) -> None:
    assert main(["submit", *images, "--question", "What color?"]) == 0
    out = capsys.readouterr().out.split()
    assert out == queued_ids(r)
    assert len(out) == 2


@pytest.mark.integration
def test_submit_json_and_a_bad_image(r: redis.Redis, images: list[str], capsys) -> None:
    argv = ["submit", images[0], "/no/such.png", "-q", "Color?", "--priority", "2", "--json"]
    assert main(argv) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [submitted] = queued_ids(r, "vlmq\x06\x162")
    assert lines == [
        {"image": images[0], "task_id": submitted},
        {
            "image": "/no/such.png",
            "task_id": None,
            "error": "InvalidImage",
            "message": lines[1]["message"],
        },
    ]
    assert "No such file" in lines[1]["message"]


def _answer_queue(stop: threading.Event) -> None:
    """Stand-in worker: answers the first queued task, fails the second."""
    app = make_celery_app(Settings(redis_url=REDIS_URL))
    r = redis.Redis.from_url(REDIS_URL)
    answered = 0
    while answered < 2 and not stop.wait(0.02):
        raw = r.rpop("vlmq")
        if raw is None:
            continue
        message = json.loads(raw)
        task_id = message["headers"]["id"]
        question = json.loads(base64.b64decode(message["body"]))[1]["question"]
        if answered == 0:
            result = {
                "answer": f"Red, to '{question}'",
                "stages": {
                    "summary": None,
                    "caption": "red",
                    "reasoning": None,
                    "conclusion": "Red",
                },
                "prompt_tokens": 10,
                "answer_tokens": 2,
                "timings": {"queued_ms": 1.0, "batch_size": 1, "gpu_ms": 2.0},
                "model": "tiny",
            }
            app.backend.store_result(task_id, result, states.SUCCESS)
        else:
            app.backend.mark_as_failure(task_id, ModelError("out of memory"))
        answered += 1
    r.close()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Call to deprecated setex")
@pytest.mark.parametrize("as_json", [False, True])
def test_submit_wait(r: redis.Redis, images: list[str], capsys, as_json: bool) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=_answer_queue, args=(stop,))
    worker.start()
    try:
        argv = ["submit", *images, "-q", "Color?", "--wait", "--timeout", "10"]
        status = main([*argv, "--json"] if as_json else argv)
    finally:
        stop.set()
        worker.join()
    captured = capsys.readouterr()
    assert status == 1
    if as_json:
        answered, failed = (json.loads(line) for line in captured.out.splitlines())
        assert answered["image"] == images[0]
        assert answered["answer"] == "Red, to 'Color?'"
        assert answered["timings"]["batch_size"] == 1
        assert failed["error"] == "ModelError"
        assert failed["message"] == "out of memory"
    else:
        assert "Red, to 'Color?'" in captured.out
        assert "[caption] red" in captured.out
        assert "batch of 1" in captured.out
        assert f"{images[1]}: ModelError: out of memory" in captured.err


@pytest.mark.integration
def test_wait_times_out(r: redis.Redis, images: list[str], capsys) -> None:
    assert main(["submit", images[0], "-q", "Color?", "--wait", "--timeout", "0"]) == 1
    assert "TimeoutError" in capsys.readouterr().err


def test_configuration_error(monkeypatch: pytest.MonkeyPatch, images: list[str], capsys) -> None:
    monkeypatch.setenv("REDIS_URL", "http://localhost:6379")
    assert main(["submit", images[0], "-q", "Color?"]) == 2
    assert "REDIS_URL must look like redis://" in capsys.readouterr().err


def test_usage_errors() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["submit", "cat.png"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit):
        main(["submit", "cat.png", "-q", "Why?", "--priority", "10"])


def test_worker_commands_are_forwarded_to_python_m_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exec(Exception):
        pass

    def execv(path: str, argv: list[str]) -> None:
        raise Exec(path, argv)

    monkeypatch.setattr(os, "execv", execv)
    for argv in (
        ["worker", "--gpu", "1", "--", "--concurrency=1", "-Q", "x"],
        ["make-tiny-model", "/tmp/tiny"],
        ["demo"],
    ):
        with pytest.raises(Exec) as called:
            main(argv)
        assert called.value.args == (sys.executable, [sys.executable, "-m", "worker", *argv])


def test_a_command_without_its_extra_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    assert main(["worker", "--gpu", "0"]) == 2
    assert "pip install 'vlmq[worker]'" in capsys.readouterr().err


def test_worker_cli_parses_what_vlmq_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import cli

    seen = []
    monkeypatch.setattr(cli, "worker_command", lambda args: seen.append(args) or 7)
    assert cli.main(["worker", "--gpu", "1", "--", "--concurrency=1", "-Q", "x"]) == 7
    assert (seen[0].gpu, seen[0].loglevel) == (1, "info")
    assert seen[0].extra == ["--", "--concurrency=1", "-Q", "x"]
    assert cli.main(["worker", "--loglevel", "debug"]) == 7
    assert (seen[1].gpu, seen[1].loglevel, seen[1].extra) == (None, "debug", [])


def test_help_lists_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("submit", "worker", "make-tiny-model", "demo"):
        assert command in out
