"""The claim check: image bytes live in Redis under their sha256; messages carry only the key."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis as redis_lib

from producer.errors import ConfigurationError, ImageUnavailable
from producer.keys import IMAGE_PREFIX


class ImageStore:
    """Image bytes in Redis under ``vlmq:image:<sha256 hex>``, each with a TTL.

    The same bytes always get the same key, so an image sent twice is stored once; storing
    it again refreshes its TTL.
    """

    def __init__(self, redis: redis_lib.Redis, ttl_s: int = 3600) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigurationError(
                "ImageStore needs a Redis client that returns bytes: create it without "
                "decode_responses=True"
            )
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
            raise ConfigurationError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self._redis = redis
        self.ttl_s = ttl_s

    @staticmethod
    def key_for(data: bytes) -> str:
        """The claim-check key of ``data``: ``vlmq:image:<sha256 hex>``."""
        return IMAGE_PREFIX + hashlib.sha256(data).hexdigest()

    def put(self, data: bytes) -> str:
        """Store ``data`` for ``ttl_s`` seconds (or refresh its TTL) and return its key."""
        return self.put_many([data])[0]

    def put_many(self, items: Sequence[bytes]) -> list[str]:
        """Store several images in two round trips; returns their keys, in order."""
        keys = [self.key_for(data) for data in items]
        refreshed = self.keep(keys)  # first, so bytes already in Redis are not sent again
        with self._redis.pipeline(transaction=False) as pipe:
            for key, data, exists in zip(keys, items, refreshed, strict=True):
                if not exists:
                    pipe.set(key, data, nx=True, ex=self.ttl_s)
            pipe.execute()
        return keys

    def keep(self, keys: Sequence[str]) -> list[bool]:
        """Restart the TTL of the images under ``keys`` (one round trip); True for each one
        still stored."""
        with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.expire(key, self.ttl_s)
            return [bool(done) for done in pipe.execute()]

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``.

        Raises:
            ImageUnavailable: nothing is stored under ``key``.
        """
        data = self._redis.get(key)
        if data is None:
            raise ImageUnavailable(
                f"image {key} is not in Redis: its claim-check TTL may have passed "
                "(VLMQ_IMAGE_TTL_S) or it was never stored; submit the image again"
            )
        return data


class MemoryImageStore:
    """The claim check kept in this process's memory, with :class:`ImageStore`'s interface.

    For a broker-less setup in one process (Celery's in-memory transport) and for
    in-process benchmarks; images are never evicted.
    """

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, items: Sequence[bytes]) -> list[str]:
        keys = [ImageStore.key_for(data) for data in items]
        self._data.update(zip(keys, items, strict=True))
        return keys

    def get(self, key: str) -> bytes:
        try:
            return self._data[key]
        except KeyError:
            raise ImageUnavailable(f"image {key} was never stored in this process") from None
