"""Reading stored results from an asyncio event loop, without blocking it."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

import redis.asyncio

#: Shortest and longest pause between two reads of a result not stored yet.
FIRST_POLL_S = 0.05
LAST_POLL_S = 0.5


class AsyncResultReader:
    """Reads Celery's stored task results from Redis (``url``) in an event loop.

    Redis connections belong to the loop that opened them, so each running loop gets its
    own pool; a pool goes with its loop.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis]
        self._clients = weakref.WeakKeyDictionary()

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = redis.asyncio.Redis.from_url(self._url)
        return client

    async def wait(
        self, key: str | bytes, ready: Callable[[bytes], bool], timeout: float | None
    ) -> bytes | None:
        """The value at ``key`` once ``ready(value)`` holds, polled with a growing pause;
        None when ``timeout`` seconds (None: no limit) pass first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = FIRST_POLL_S
        while True:
            raw = await self._client().get(key)
            if raw is not None and ready(raw):
                return raw
            if deadline is not None and loop.time() >= deadline:
                return None
            left = LAST_POLL_S if deadline is None else deadline - loop.time()
            await asyncio.sleep(max(0.0, min(pause, left)))
            pause = min(pause * 2, LAST_POLL_S)
