"""The ``vlmq`` command line."""

import base64
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import states
from conftest import REDIS_TEST_URL
from PIL import Image

import producer
from producer.cli import main
from producer.config import Settings, make_celery_app
from producer.errors import ModelError

REDIS_URL = REDIS_TEST_URL  # the tests' own database (conftest)


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


STORED = {
    "answer": "Red",
    "stages": None,
    "prompt_tokens": 10,
    "answer_tokens": 1,
    "timings": {"queued_ms": 1.0, "batch_size": 3, "gpu_ms": 2.0},
    "model": "tiny",
}


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


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlmq {producer.__version__}"
    assert producer.__version__ == importlib.metadata.version("vlmq")


@pytest.mark.integration
def test_submit_with_expires_and_model(r: redis.Redis, images: list[str], capsys) -> None:
    argv = ["submit", images[0], "-q", "Color?", "--expires", "60", "--model", "tiny.fp32"]
    assert main(argv) == 0
    (task_id,) = capsys.readouterr().out.split()
    assert queued_ids(r, "vlmq.tiny.fp32") == [task_id] and not r.llen("vlmq")
    headers = json.loads(r.lindex("vlmq.tiny.fp32", 0))["headers"]
    assert headers["expires"] is not None


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Call to deprecated setex")
def test_result_and_revoke_by_id(r: redis.Redis, images: list[str], capsys) -> None:
    assert main(["submit", *images, "-q", "Color?"]) == 0
    answered, revoked = capsys.readouterr().out.split()
    r.delete("vlmq")  # the stand-in worker below answers only the first
    app = make_celery_app(Settings(redis_url=REDIS_URL))
    app.backend.store_result(answered, STORED, states.SUCCESS)
    assert main(["revoke", revoked]) == 0
    assert capsys.readouterr().out.strip() == f"revoked {revoked}"
    assert main(["result", answered, revoked, "--json", "--timeout", "5"]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first == {"task_id": answered, **STORED}
    assert second["task_id"] == revoked and second["error"] == "TaskRevoked"
    assert main(["result", answered]) == 0
    assert f"== task {answered}" in capsys.readouterr().out


def test_the_cli_runs_on_the_base_install_without_torch(tmp_path: Path) -> None:
    """The producer side never imports torch or transformers (`pip install vlmq`)."""
    script = (
        "import sys; sys.modules.update(torch=None, transformers=None)\n"
        "from producer.cli import main\n"
        "for argv in (['submit', '--help'], ['result', '--help'], ['revoke', '--help'], "
        "['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--expires S" in done.stdout and "--model ID" in done.stdout
