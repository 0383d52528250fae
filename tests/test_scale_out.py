"""Several workers on one Redis, and routing by served model."""

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis
from PIL import Image
from reliability_support import unacked_task_ids

from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.errors import ConfigurationError, WrongModel
from producer.protocol import TASK_NAME, AnalysisRequest, model_queue, served_model_id
from worker.cli import parse_gpus, supervise

pytestmark = pytest.mark.integration


def image(i: int) -> Image.Image:
    return Image.new("RGB", (32 + i, 32), (20 * i % 256, 100, 150))


def test_two_workers_share_a_thousand_tasks(start_worker, redis_url):
    workers = [start_worker(VLMQ_MAX_BATCH_SIZE="8", VLMQ_MAX_WAIT_MS="50") for _ in range(2)]
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    handles = client.submit_many(
        {"image": image(i % 10), "question": f"Task {i}?", "max_new_tokens": 2} for i in range(1000)
    )
    results = [h.result(timeout=300) for h in handles]
    assert len(results) == 1000 and all(r.answer_tokens >= 1 for r in results)
    backend = client.app.backend
    done_by = Counter(backend.get_task_meta(h.id)["worker"] for h in handles)
    assert sum(done_by.values()) == 1000
    assert len(done_by) == 2, done_by  # both workers did work
    assert all(w.alive() for w in workers)


def test_a_busy_worker_leaves_the_backlog_in_redis(
    start_worker, redis_url, forced_length_model_dir
):
    slots = 4
    start_worker(VLMQ_MODEL=str(forced_length_model_dir), VLMQ_MAX_BATCH_SIZE=str(slots))
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    handles = client.submit_many(
        {"image": image(i % 10), "question": f"Long {i}?", "max_new_tokens": 48} for i in range(40)
    )
    r = redis.Redis.from_url(redis_url)
    held = []
    while not handles[-1].ready():
        held.append(len(unacked_task_ids(r)))
        time.sleep(0.02)
    assert all(h.result(timeout=60).answer_tokens == 48 for h in handles)
    # Its slots and a quarter more (at least 2): the rest waited in Redis for other workers.
    assert max(held) == slots + 2, Counter(held)
    r.close()
    client.close()


def test_tasks_are_routed_by_served_model(start_worker, redis_url, tiny_model_dir):
    start_worker()
    served = served_model_id(str(tiny_model_dir), "fp32")
    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)

    routed = client.submit(image(1), "Routed?", max_new_tokens=2, model=served)
    assert routed.result(timeout=60).model == served

    # A message for another model that lands in this worker's queue fails alone, named.
    buffer = io.BytesIO()
    image(2).save(buffer, "PNG")
    request = AnalysisRequest(
        image_key=client.images.put(buffer.getvalue()),
        question="Wrong model?",
        max_new_tokens=2,
        model="some-other-model.bf16",
    )
    wrong = make_celery_app(settings).send_task(
        TASK_NAME, kwargs=request.to_message(), queue=model_queue(settings.queue, served)
    )
    with pytest.raises(WrongModel, match=r"some-other-model\.bf16"):
        wrong.get(timeout=60)


def test_parse_gpus():
    assert parse_gpus("all", count_gpus=lambda: 3) == ["0", "1", "2"]
    assert parse_gpus("0, 2") == ["0", "2"]
    for bad in ("", "0,0", "x", "1,-1"):
        with pytest.raises(ConfigurationError, match="--gpus"):
            parse_gpus(bad)
    with pytest.raises(ConfigurationError, match="no GPU"):
        parse_gpus("all", count_gpus=lambda: 0)


def test_supervisor_stops_every_child_when_one_exits():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    started = time.monotonic()
    assert supervise({"0": sleeper, "1": failing}) == 3
    assert time.monotonic() - started < 30


def test_vlmq_worker_gpus_starts_one_named_worker_per_gpu(redis_url, tiny_model_dir, tmp_path):
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "VLMQ_MODEL": str(tiny_model_dir),
        "VLMQ_DEVICE": "cpu",
        "VLMQ_PRECISION": "fp32",
        # As in the start_worker fixture: two workers timing their start-up batch on two
        # shared cores with spinning torch threads can measure past the visibility timeout.
        "VLMQ_MAX_BATCH_SIZE": "4",
        "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path / "workers.log"
    log = log_path.open("wb")
    argv = [sys.executable, "-c", "from producer.cli import main; raise SystemExit(main())"]
    parent = subprocess.Popen(
        [*argv, "worker", "--gpus", "0,1", "--loglevel", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        app = make_celery_app(Settings.from_env({"REDIS_URL": redis_url}))
        names: set[str] = set()
        deadline = time.monotonic() + 90
        while len(names) < 2 and time.monotonic() < deadline:
            names = {name for reply in app.control.ping(timeout=1) for name in reply}
        assert {n.split("@")[0] for n in names} == {"vlmq-gpu0", "vlmq-gpu1"}, log_path.read_text()
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(60)
        log.close()
    assert code == 0, log_path.read_text()
