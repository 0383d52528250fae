"""compose.yaml: the services a GPU host needs, wired as the README says."""

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


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
        assert "model-cache:/root/.cache/huggingface" in worker["volumes"]
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
