"""The named errors of vlmq.

Every error a task can fail with is one of these. They travel through the Celery
result backend as (module, class, message) and are raised again, with the same
class, by :meth:`producer.TaskHandle.result` — so callers can ``except InvalidImage``.
Each takes exactly one argument, the message, so Celery can rebuild it.
"""


class VlmqError(Exception):
    """Base of every vlmq error."""


class ConfigurationError(VlmqError):
    """A setting is missing or wrong; the message says how to fix it."""


class InvalidRequest(VlmqError):
    """The request itself is malformed: question, options or payload."""


class InvalidImage(InvalidRequest):
    """The image cannot be used: undecodable, empty, too large, or not an image."""


class ImageUnavailable(InvalidRequest):
    """The image's claim-check entry is gone from Redis (its TTL passed) or never existed."""


class ImageFetchError(InvalidImage):
    """An image URL could not be fetched within the limits, or is not allowed."""


class WrongModel(InvalidRequest):
    """The request names a model that the worker which received it does not serve."""


class ModelError(VlmqError):
    """The model failed on this request alone, after it was retried on its own."""


class QueueFull(VlmqError):
    """The queue is deeper than the configured limit; try again later."""


class TaskExpired(VlmqError):
    """The task's ``expires`` deadline passed before a worker started it; it never ran."""


class TaskRevoked(VlmqError):
    """The task was revoked before a worker started it; it never ran."""
