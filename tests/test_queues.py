import time
from types import SimpleNamespace

import pytest
import redis
from kombu.transport.redis import Channel
from PIL import Image

from producer.client import Client
from producer.config import Settings
from producer.exporter import QueueCollector
from producer.queues import QueueStats, priority_lists, queue_depth, queue_stats
from worker.celery_app import create_worker_app
from worker.routing import RoutingStep
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def test_priority_lists_follow_kombu_naming():
    assert priority_lists("vlmq")[:3] == ["vlmq", "vlmq\x06\x161", "vlmq\x06\x162"]
    assert len(priority_lists("vlmq")) == 10


def test_depth_and_oldest_age_of_a_queue_with_priorities(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)
    r = redis.Redis.from_url(redis_url)
    assert queue_stats(r, settings.queue) == QueueStats(settings.queue, 0, None)
    before = time.time()
    img = Image.new("RGB", (16, 16), "red")
    client.submit(img, "first?", priority=7)
    client.submit(img, "second?", priority=0)
    client.submit(img, "third?")
    stats = queue_stats(r, settings.queue, now=before + 100)
    assert stats.depth == queue_depth(r, settings.queue) == 3
    assert 99 <= stats.oldest_age_s <= 100


def test_exporter_serves_depth_and_age_of_every_queue(redis_url):
    from prometheus_client import CollectorRegistry, generate_latest

    settings = Settings.from_env({"REDIS_URL": redis_url})
    client = Client(settings)
    img = Image.new("RGB", (16, 16), "blue")
    client.submit(img, "shared?")
    client.submit(img, "routed?", model="some-model.bf16", priority=3)
    registry = CollectorRegistry()
    registry.register(QueueCollector(redis.Redis.from_url(redis_url), settings.queue))
    text = generate_latest(registry).decode()
    assert 'vlmq_queue_depth{queue="vlmq"} 1.0' in text
    assert 'vlmq_queue_depth{queue="vlmq.some-model.bf16"} 1.0' in text
    assert 'vlmq_queue_oldest_age_seconds{queue="vlmq.some-model.bf16"}' in text


def test_a_raw_publish_reaches_only_the_queue_its_routing_key_names(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url})
    r = redis.Redis.from_url(redis_url)
    # A binding as vlmq made them before exact routing: a model queue under the key "vlmq".
    stale = Channel.sep.join(["vlmq", "", "vlmq.old-model.bf16"])
    r.sadd(Channel.keyprefix_queue % "vlmq", stale)
    app = create_worker_app(settings, WorkerSettings(model="/m/Tiny", device="cpu"))
    RoutingStep(SimpleNamespace(app=app)).start(SimpleNamespace(app=app))
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():  # declared as the worker's consumer does
            queue(conn.default_channel).declare()
        with conn.Producer() as producer:
            for key in ("vlmq.tiny.bf16", "vlmq", "vlmq.tiny.bf16", "vlmq.other.bf16"):
                producer.publish({"to": key}, exchange="vlmq", routing_key=key)
    depths = {q: queue_depth(r, q) for q in ("vlmq", "vlmq.tiny.bf16", "vlmq.old-model.bf16")}
    assert depths == {"vlmq": 1, "vlmq.tiny.bf16": 2, "vlmq.old-model.bf16": 0}
    assert not r.sismember(Channel.keyprefix_queue % "vlmq", stale)


def test_a_submitted_task_lands_in_its_queue_only(redis_url):
    settings = Settings.from_env({"REDIS_URL": redis_url})
    app = create_worker_app(settings, WorkerSettings(model="/m/Tiny", device="cpu"))
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():
            queue(conn.default_channel).declare()
    client = Client(settings)
    img = Image.new("RGB", (16, 16), "green")
    client.submit(img, "shared?")
    client.submit(img, "routed?", model="tiny.bf16")
    r = redis.Redis.from_url(redis_url)
    assert queue_depth(r, "vlmq") == 1 and queue_depth(r, "vlmq.tiny.bf16") == 1
