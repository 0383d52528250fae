"""``vlmq demo`` in its two fallbacks: a private redis-server, and the in-memory transport."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(
    tiny_model_dir: Path,
    tmp_path: Path,
    *,
    with_redis_binary: bool,
    redis_url: str = "redis://127.0.0.1:1/0",  # nothing answers there
) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_redis_binary:
        os.symlink(shutil.which("redis-server"), bin_dir / "redis-server")
    env = {
        **os.environ,
        "PATH": str(bin_dir),  # hides the system redis-server unless linked above
        "REDIS_URL": redis_url,
        "VLMQ_DEMO_MODEL_DIR": str(tiny_model_dir),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; raise SystemExit(main(['demo']))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.integration
def test_demo_starts_a_private_redis_when_none_answers(tiny_model_dir, tmp_path):
    out = run_demo(tiny_model_dir, tmp_path, with_redis_binary=True)
    assert "started a private embedded redis-server" in out
    assert "10/10 answered" in out


def test_demo_falls_back_to_the_in_memory_transport_and_says_so(tiny_model_dir, tmp_path):
    out = run_demo(tiny_model_dir, tmp_path, with_redis_binary=False)
    assert "in-memory transport" in out
    assert "10/10 answered" in out
    batch_sizes = out.rsplit("batch sizes seen:", 1)[1]
    assert any(f"{n} (x" in batch_sizes for n in range(2, 9))


@pytest.mark.integration
def test_demo_writes_only_into_an_empty_database_and_empties_it(
    tiny_model_dir, tmp_path, private_redis
):
    import redis

    url = private_redis.url()
    base = url.rsplit("/", 1)[0]
    for db in (0, 15):  # database 15 is busy, so the demo takes 14
        with redis.Redis.from_url(f"{base}/{db}") as client:
            client.set("someone-elses-key", "keep")
    out = run_demo(tiny_model_dir, tmp_path, with_redis_binary=False, redis_url=f"{base}/0")
    assert f"Broker: the Redis at {base}/14 (database 14 was empty" in out
    assert "10/10 answered" in out and "Removed the demo's" in out
    for db in range(16):
        with redis.Redis.from_url(f"{base}/{db}") as client:
            assert client.keys() == ([b"someone-elses-key"] if db in (0, 15) else []), db
