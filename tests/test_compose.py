"""compose.yaml and the worker image: the services a GPU host needs, wired as the README says."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def test_has_redis_worker_flower_producer_and_exporter():
    assert {"redis", "worker-gpu0", "flower", "producer", "exporter"} <= set(SERVICES)


def test_redis_persists_accepted_tasks():
    command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_gpu_workers_reserve_their_own_gpu_and_share_the_model_cache():
    for name, gpu in (("worker-gpu0", "0"), ("worker-gpu1", "1")):
        worker = SERVICES[name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["device_ids"] == [gpu]
        assert "model-cache:/home/vlmq/.cache/huggingface" in worker["volumes"]
        command = worker["command"]
        assert command[:4] == ["celery", "-A", "worker.app", "worker"]
        assert "--pool=solo" in command and f"vlmq-gpu{gpu}@%h" in command
        assert worker["environment"]["VLMQ_MODEL"]
        assert worker["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert "model-cache" in COMPOSE["volumes"]


def test_flower_is_behind_basic_auth_and_local_only():
    flower = SERVICES["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_producer_image_has_no_gpu():
    assert SERVICES["producer"]["build"]["target"] == "producer"
    assert "deploy" not in SERVICES["producer"]


def test_the_header_commands_name_real_services_and_mount_what_they_submit():
    header = [line for line in COMPOSE_TEXT.splitlines() if line.startswith("#")]
    up = next(line for line in header if "docker compose up" in line)
    assert set(up.split("up -d", 1)[1].split()) <= set(SERVICES)
    run = " ".join(header[header.index(next(h for h in header if "compose run" in h)) :])
    assert '-v "$PWD:/in:ro" producer' in run and "vlmq submit /in/" in run


def test_flower_reads_the_broker_from_redis_url_and_persists():
    command = " ".join(SERVICES["flower"]["command"])
    assert '--broker="$$REDIS_URL"' in command and "--persistent=True" in command
    assert "redis://" not in command
    assert any(v.startswith("flower-data:") for v in SERVICES["flower"]["volumes"])


def test_worker_flower_and_exporter_have_healthchecks():
    for name in ("worker-gpu0", "worker-gpu1", "flower", "exporter"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert "vlmq-gpu1@" in " ".join(SERVICES["worker-gpu1"]["healthcheck"]["test"])
    assert "/healthcheck" in " ".join(SERVICES["flower"]["healthcheck"]["test"])


def test_the_images_run_unprivileged_with_the_tested_torch_and_a_compiler():
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    assert stages[0].startswith("python:3.11-slim AS base")
    for stage in stages[1:]:
        assert re.search(r"^USER vlmq$", stage, flags=re.MULTILINE), stage.splitlines()[0]
    worker = next(stage for stage in stages if stage.startswith("base AS worker"))
    assert '"torch==2.11.*"' in worker and "gcc" in worker
    producer = next(stage for stage in stages if stage.startswith("base AS producer"))
    assert "COPY worker" not in stages[0] + producer  # the producer image has no worker code


def test_docker_compose_v2_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("Docker Compose v2 (`docker compose`) is not installed here")
    done = subprocess.run(
        [docker, "compose", "-f", ROOT / "compose.yaml", "config", "--quiet"],
        env={**os.environ, "FLOWER_BASIC_AUTH": "admin:secret"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
