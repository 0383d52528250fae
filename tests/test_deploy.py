"""deploy/vlmq-worker@.service: a unit that systemd reads as written (no directive ignored)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "vlmq-worker@.service"


def test_no_directive_carries_a_trailing_comment():
    # systemd takes "300   # ..." as the value and ignores the directive with a warning.
    directives = [line for line in UNIT.read_text().splitlines() if "=" in line]
    assert directives and not [line for line in directives if "#" in line.split("=", 1)[1]]


def test_systemd_analyze_verify_accepts_an_instance(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("no systemd-analyze on PATH: `apt-get install -y systemd` (.ci/run does)")
    # The instance as installed, with ExecStart pointing at this environment's celery.
    celery = Path(sys.executable).with_name("celery")
    instance = tmp_path / "vlmq-worker@0.service"
    instance.write_text(UNIT.read_text().replace("/opt/vlmq/.venv/bin/celery", str(celery)))
    done = subprocess.run([analyze, "verify", instance], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert "TimeoutStopSec=300\n" in instance.read_text()
