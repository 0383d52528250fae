"""``celery -A worker.app``: a plain worker shows its progress and a ready line without
``--loglevel``; ``inspect`` needs neither ``VLMQ_MODEL`` nor torch."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.cli import celery_worker_argv

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WITHOUT_TORCH = "import sys; sys.modules.update(torch=None, transformers=None); "


def celery(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``celery ARGS`` in a process where importing torch or transformers fails."""
    script = (
        WITHOUT_TORCH
        + f"from celery.__main__ import main; sys.argv = ['celery', *{args!r}]; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_a_plain_worker_logs_progress_and_answers_inspect_without_the_model(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
):
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    env.pop("VLMQ_MODEL", None)
    worker_env = {**env, "VLMQ_MODEL": str(tiny_model_dir), "VLMQ_DEVICE": "cpu",
                  "VLMQ_PRECISION": "fp32", "VLMQ_MAX_BATCH_SIZE": "2", "OMP_NUM_THREADS": "1",
                  "VLMQ_METRICS_PORT": "0"}  # fmt: skip
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            celery_worker_argv(
                loglevel=None, node="plain@%h", extra=["--without-mingle", "--without-gossip"]
            ),
            env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "ready: serving tiny" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.2)
            text = log_path.read_text(errors="replace")
            assert "Loaded " in text and "Warmed up in" in text
            assert "from queues vlmq, vlmq.tiny" in text

            ping = celery("-A", "worker.app", "inspect", "ping", "-t", "10", env=env)
            assert ping.returncode == 0, ping.stderr
            assert "plain@" in ping.stdout and "pong" in ping.stdout
        finally:
            proc.terminate()
            proc.wait(60)


def test_a_worker_without_a_model_says_what_to_set(redis_url: str):
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    env.pop("VLMQ_MODEL", None)
    done = celery("-A", "worker.app", "worker", "--without-mingle", env=env)
    assert done.returncode != 0
    assert "vlmq worker: VLMQ_MODEL is not set" in done.stderr
