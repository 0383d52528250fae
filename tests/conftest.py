"""Shared fixtures: the tiny random Mllama, built once per test session."""

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reliability_support import RedisServer, ResultWrites

from worker.cli import celery_worker_argv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-mllama"))


@pytest.fixture(scope="session")
def forced_length_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with an end of turn it never generates: every answer runs to its
    ``max_new_tokens``, so how long a task stays in the model is known (the bench's trick)."""
    target = tmp_path_factory.mktemp("forced") / "tiny-forced"
    shutil.copytree(tiny_model_dir, target)
    path = target / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = [2**31 - 1]  # beyond the vocabulary
    path.write_text(json.dumps(config))
    return target


REDIS_TEST_URL = os.environ.get("VLMQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database, emptied before and after each test."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis answers at {REDIS_TEST_URL}; start one (`make redis`)")
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


class WorkerProcess:
    """A real ``celery -A worker.app worker`` process on the tiny model."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.name = name
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            celery_worker_argv(
                loglevel="INFO", node=name, extra=["--without-mingle", "--without-gossip"]
            ),
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_worker(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes on the tiny model (CPU); all are stopped at teardown."""
    workers: list[WorkerProcess] = []

    def start(**overrides: str) -> WorkerProcess:
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "VLMQ_MODEL": str(tiny_model_dir),
            "VLMQ_DEVICE": "cpu",
            "VLMQ_PRECISION": "fp32",
            "VLMQ_MAX_BATCH_SIZE": "8",
            "VLMQ_MAX_WAIT_MS": "100",
            # One intra-op thread: on a small shared CPU, torch's spinning threads make the
            # tiny model's step time swing 30x, and the start-up visibility check times it.
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            **overrides,
        }
        name = f"test{len(workers)}-{uuid.uuid4().hex[:6]}@%h"
        worker = WorkerProcess(env, tmp_path / f"worker{len(workers)}.log", name)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` (persisted as in compose.yaml) that a test may kill and start
    again; the shared Redis is never restarted."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def result_writes(private_redis: RedisServer) -> Iterator[ResultWrites]:
    """Counts every result stored in ``private_redis``, per task id."""
    writes = ResultWrites(private_redis.url())
    yield writes
    writes.close()
