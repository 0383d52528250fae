"""vlmq producer: enqueue image-analysis tasks for the Llama-3.2-Vision worker.

    import producer

    handle = producer.submit("cat.jpg", "What is on the table?")
    print(handle.result(timeout=60).answer)

:func:`submit` and :func:`submit_many` use a default :class:`Client` configured from the
environment (``REDIS_URL``, ``VLMQ_*``), created on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from producer.client import Client, TaskHandle
from producer.config import Settings
from producer.errors import (
    ConfigurationError,
    ImageFetchError,
    ImageUnavailable,
    InvalidImage,
    InvalidRequest,
    ModelError,
    QueueFull,
    TaskExpired,
    TaskRevoked,
    VlmqError,
    WrongModel,
)
from producer.images import ImageSource
from producer.protocol import Limits
from producer.results import AnalysisResult, CotStages, Timings

try:
    __version__ = version("vlmq")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AnalysisResult",
    "Client",
    "ConfigurationError",
    "CotStages",
    "ImageFetchError",
    "ImageUnavailable",
    "InvalidImage",
    "InvalidRequest",
    "Limits",
    "ModelError",
    "QueueFull",
    "Settings",
    "TaskExpired",
    "TaskHandle",
    "TaskRevoked",
    "Timings",
    "VlmqError",
    "WrongModel",
    "submit",
    "submit_many",
]

_default_client: Client | None = None
_default_client_lock = threading.Lock()


def _client() -> Client:
    global _default_client
    with _default_client_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def submit(image: ImageSource, question: str, **options: Any) -> TaskHandle:
    """:meth:`Client.submit` on the default client."""
    return _client().submit(image, question, **options)


def submit_many(items: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> list[TaskHandle]:
    """:meth:`Client.submit_many` on the default client."""
    return _client().submit_many(items)
