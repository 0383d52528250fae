"""``pip install .`` without extras: the producer side works, and the GPU commands say which
extra they need (a fresh venv, built once per session: about 10 s)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_vlmq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``vlmq`` script of a venv holding ``pip install .`` (no extras), built from a copy
    of the package sources (pip builds in the source tree)."""
    tmp = tmp_path_factory.mktemp("base-install")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("producer", "worker"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        check=True,
        capture_output=True,
    )
    return venv / "bin" / "vlmq"


def run(vlmq: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Outside the repository and without PYTHONPATH: only what the venv installed is seen.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(vlmq), *args],
        env={**clean, **(env or {})},
        cwd=vlmq.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_base_install_has_no_torch(base_vlmq: Path):
    python = base_vlmq.parent / "python"
    for module in ("torch", "transformers"):
        code = f"import importlib.util as u; raise SystemExit(u.find_spec({module!r}) is not None)"
        assert subprocess.run([str(python), "-c", code]).returncode == 0, module


def test_help_lists_every_command(base_vlmq: Path):
    done = run(base_vlmq, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("submit", "top", "report", "exporter", "worker", "demo", "make-tiny-model"):
        assert command in done.stdout


@pytest.mark.integration
def test_submit_and_top_run(base_vlmq: Path, redis_url: str, tmp_path: Path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    env = {"REDIS_URL": redis_url}
    done = run(base_vlmq, "submit", str(image), "-q", "What colour?", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert '"task_id"' in done.stdout
    assert redis.Redis.from_url(redis_url).llen("vlmq") == 1
    # No worker sends events here: it listens, says so, exits 1 (and imports no worker code).
    done = run(base_vlmq, "top", "--once", "--listen", "0.5", env=env)
    assert done.returncode == 1 and "no worker events" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [(["worker", "--gpu", "0"], "worker"), (["demo"], "worker"), (["report", "x"], "monitor")],
)
def test_a_command_that_needs_an_extra_names_it(base_vlmq: Path, command, extra):
    done = run(base_vlmq, *command)
    assert done.returncode == 2
    assert f"pip install 'vlmq[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
