"""``vlmq demo`` in its two fallbacks: a private redis-server, and the in-memory transport."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tiny_model_dir: Path, tmp_path: Path, *, with_redis_binary: bool) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_redis_binary:
        os.symlink(shutil.which("redis-server"), bin_dir / "redis-server")
    env = {
        **os.environ,
        "PATH": str(bin_dir),  # hides the system redis-server unless linked above
        "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing answers there
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
