"""Several workers on one Redis, and routing by served model."""

import io
from collections import Counter

import pytest
from PIL import Image

from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.errors import WrongModel
from producer.protocol import TASK_NAME, AnalysisRequest, model_queue, served_model_id

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
