"""The image claim check, against the real Redis (db 15)."""

import hashlib
from collections.abc import Iterator

import pytest
import redis

from producer.claimcheck import ImageStore
from producer.errors import ConfigurationError, ImageUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_key_is_the_sha256() -> None:
    assert ImageStore.key_for(b"abc") == "vlmq:image:" + hashlib.sha256(b"abc").hexdigest()


def test_put_then_get(r: redis.Redis) -> None:
    store = ImageStore(r, ttl_s=60)
    key = store.put(b"\x89PNG bytes")
    assert key == ImageStore.key_for(b"\x89PNG bytes")
    assert store.get(key) == b"\x89PNG bytes"
    assert 0 < r.ttl(key) <= 60


def test_same_bytes_are_stored_once_and_ttl_refreshed(r: redis.Redis) -> None:
    store = ImageStore(r, ttl_s=100)
    first = store.put(b"same")
    r.expire(first, 5)
    second = store.put(b"same")
    assert first == second
    assert r.keys("vlmq:image:*") == [first.encode()]
    assert r.ttl(first) > 5


def test_put_many(r: redis.Redis) -> None:
    store = ImageStore(r, ttl_s=60)
    existing = store.put(b"one")
    keys = store.put_many([b"one", b"two", b"two"])
    assert keys == [existing, ImageStore.key_for(b"two"), ImageStore.key_for(b"two")]
    assert sorted(r.keys("vlmq:image:*")) == sorted({k.encode() for k in keys})
    assert store.put_many([]) == []


def test_missing_key(r: redis.Redis) -> None:
    store = ImageStore(r)
    with pytest.raises(ImageUnavailable, match="TTL may have passed"):
        store.get(ImageStore.key_for(b"never stored"))


@pytest.mark.parametrize("ttl_s", [0, -1, 1.5, True])
def test_bad_ttl(r: redis.Redis, ttl_s: object) -> None:
    with pytest.raises(ConfigurationError, match="ttl_s"):
        ImageStore(r, ttl_s=ttl_s)  # type: ignore[arg-type]


def test_decoding_client_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="decode_responses"):
        ImageStore(redis.Redis.from_url("redis://127.0.0.1:6379/15", decode_responses=True))
