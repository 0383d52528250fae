import time

import pytest
import redis
from PIL import Image

from producer.client import Client
from producer.config import Settings
from producer.exporter import QueueCollector
from producer.queues import QueueStats, priority_lists, queue_depth, queue_stats

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
