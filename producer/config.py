"""Settings from the environment, and the Celery app that producer and worker both build."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, fields

from celery import Celery

from producer.errors import ConfigurationError

DEFAULT_QUEUE = "vlmq"
_URL_FORM = "redis://[[username]:password@]host[:port][/db] (or rediss:// for TLS)"


def env_int(
    environ: Mapping[str, str], name: str, default: int, *, low: int = 1, high: int | None = None
) -> int:
    """Read the integer ``environ[name]`` in ``low..high``; unset or empty gives ``default``.

    Raises:
        ConfigurationError: the value is not such an integer; the message shows the form.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigurationError(
            f"{name} must be an integer in {allowed} such as {name}={default}, got {raw!r}"
        )
    return value


def is_redis_url(url: object) -> bool:
    """Whether ``url`` (a broker URL) names Redis: the ledger, the sweeper and the attempt
    counters need it; the demo's in-memory transport has none of them."""
    return str(url or "").startswith(("redis://", "rediss://"))


@dataclass(frozen=True, repr=False)
class Settings:
    """Where the broker is and how long things live; see :meth:`from_env` for the variables.

    ``redis_url`` is both the Celery broker and result backend, and holds the image claim
    checks. Its password never appears in ``repr``; log :attr:`redacted_url` instead.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = DEFAULT_QUEUE
    image_ttl_s: int = 10800
    visibility_timeout_s: int = 7200
    result_expires_s: int = 86400
    #: Tasks waiting in a queue beyond which producers get ``QueueFull``; 0: no limit.
    max_queue_depth: int = 0

    def __post_init__(self) -> None:
        try:
            parts = urllib.parse.urlsplit(self.redis_url)
            bad_port = parts.port == 0
        except (TypeError, ValueError, AttributeError):
            bad_port = True
        if bad_port:
            raise ConfigurationError(
                f"REDIS_URL must look like {_URL_FORM} with a port from 1 to 65535, "
                "got an unparsable value"
            )
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(
                f"REDIS_URL must look like {_URL_FORM}, got {self.redacted_url!r}; "
                "other schemes (unix://, sentinel://, http://) are not supported"
            )
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                f"REDIS_URL database must be a number such as redis://host:6379/0, "
                f"got {self.redacted_url!r}"
            )
        if parts.scheme == "rediss" and "ssl_cert_reqs" not in urllib.parse.parse_qs(parts.query):
            raise ConfigurationError(
                "a rediss:// REDIS_URL must say how to check the server certificate: add "
                "ssl_cert_reqs=required (or optional, or none) to its query, e.g. "
                f"rediss://host:6380/0?ssl_cert_reqs=required; got {self.redacted_url!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read ``REDIS_URL``, ``VLMQ_QUEUE``, ``VLMQ_IMAGE_TTL_S``,
        ``VLMQ_VISIBILITY_TIMEOUT_S``, ``VLMQ_RESULT_EXPIRES_S`` and ``VLMQ_MAX_QUEUE_DEPTH``;
        unset or empty ones keep the defaults.

        Raises:
            ConfigurationError: a value is malformed; the message shows the expected form.
        """
        defaults = cls()
        return cls(
            redis_url=environ.get("REDIS_URL", "").strip() or defaults.redis_url,
            queue=environ.get("VLMQ_QUEUE", "").strip() or defaults.queue,
            image_ttl_s=env_int(environ, "VLMQ_IMAGE_TTL_S", defaults.image_ttl_s),
            visibility_timeout_s=env_int(
                environ, "VLMQ_VISIBILITY_TIMEOUT_S", defaults.visibility_timeout_s
            ),
            result_expires_s=env_int(environ, "VLMQ_RESULT_EXPIRES_S", defaults.result_expires_s),
            max_queue_depth=env_int(
                environ, "VLMQ_MAX_QUEUE_DEPTH", defaults.max_queue_depth, low=0
            ),
        )

    @property
    def redacted_url(self) -> str:
        """``redis_url`` with the password replaced by ``***``: safe to log."""
        parts = urllib.parse.urlsplit(self.redis_url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if not at or ":" not in userinfo:
            return self.redis_url
        username = userinfo.split(":", 1)[0]
        return parts._replace(netloc=f"{username}:***@{hostport}").geturl()

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["redis_url"] = self.redacted_url
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"


def make_celery_app(settings: Settings, name: str = "vlmq") -> Celery:
    """The Celery app of vlmq: Redis broker and result backend, JSON only, late acks.

    The worker builds its app with this function too and adds worker-only settings. With the
    Redis transport, message priority 0 is the highest and 9 the lowest.
    """
    transport_options = {
        "visibility_timeout": settings.visibility_timeout_s,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        # Sweep for messages of dead workers every 10 s (kombu's default scans every 100 s),
        # so they come back at most 10 s after the visibility timeout.
        "unacked_restore_throttle": 1,
    }
    app = Celery(name, broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        accept_content=["json"],
        result_accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        result_extended=True,
        result_expires=settings.result_expires_s,
        broker_transport_options=transport_options,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_default_queue=settings.queue,
        task_acks_late=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
    )
    return app
