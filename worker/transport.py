"""kombu's Redis transport, made safe against poison entries and lost connections.

The worker process serves ``redis://`` and ``rediss://`` broker URLs with :class:`Transport`
(:func:`serve_redis_urls`). Two changes to kombu 5.7's ``kombu.transport.redis.Channel``:

- an entry popped from a queue list that is not a kombu message (not JSON, not UTF-8, not
  the ``{"body", "headers", "properties": {"delivery_tag", "delivery_info", ...}}`` envelope)
  is handed to the :class:`~worker.quarantine.Quarantine` instead of raising inside kombu,
  which would end the worker (and, as the entry is already popped, lose it);
- a channel whose connection kombu already closed raises a connection error when it needs
  a new Redis client, instead of an ``AttributeError`` that ends the worker.
"""

import base64
import binascii
import json
import logging
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.quarantine import Quarantine, readable_task_id

logger = logging.getLogger(__name__)

_OPTIONAL_TEXT = (str, type(None))


def _is_utf8(value: Any) -> bool:
    """A string Redis can take as a key or field (JSON may hold lone surrogates)."""
    try:
        return isinstance(value, str) and bool(value.encode())
    except UnicodeEncodeError:
        return False


def envelope_problem(payload: Any) -> str | None:
    """What keeps a decoded queue entry from being a kombu message, or None if it is one."""
    if not isinstance(payload, dict):
        return f"the entry is JSON {type(payload).__name__}, not a kombu message object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the entry has no 'properties' object"
    if not _is_utf8(properties.get("delivery_tag")):
        return "properties.delivery_tag is not a UTF-8 string"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "properties.delivery_info lacks string 'exchange' and 'routing_key'"
    headers = payload.get("headers")
    if not isinstance(headers, (dict, type(None))):
        return "headers is not an object"
    if headers and "compression" in headers:
        return "compressed bodies are not accepted"
    for key in ("content-type", "content-encoding"):
        if not isinstance(payload.get(key), _OPTIONAL_TEXT):
            return f"{key} is not a string"
    body = payload.get("body")
    if not isinstance(body, str):
        return "body is not a string"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"unknown body_encoding {encoding!r}"
    if encoding == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    return None


def decode_entry(item: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(payload, None)`` for a usable entry, ``(None, reason)`` for a poison one."""
    try:
        # Strict UTF-8: kombu's own decoding would replace bad bytes and run what is left.
        payload = json.loads(item.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"the entry is not UTF-8 JSON: {type(exc).__name__}: {exc}"
    problem = envelope_problem(payload)
    return (None, problem) if problem else (payload, None)


class Channel(kombu_redis.Channel):
    """A Redis channel that quarantines poison entries (in :attr:`quarantine`)."""

    #: Set by :func:`serve_redis_urls`: one worker per process. (Not a transport option:
    #: those are sent to ``celery inspect stats``, which must stay JSON.)
    quarantine: Quarantine | None = None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own _brpop_read, with the entry decoded and checked before it is delivered.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # Disconnect, so that the next round reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            list_name = bytes_to_str(dest)
            queue = list_name.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload, problem = decode_entry(item)
            if problem is None:
                self.connection._deliver(payload, queue)
            else:
                self._quarantine(item, list_name, problem)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _quarantine(self, item: bytes, list_name: str, problem: str) -> None:
        task_id = None
        try:
            decoded = json.loads(item)
            if isinstance(decoded, dict):
                task_id = readable_task_id(decoded.get("headers"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        if self.quarantine is None:
            logger.error("Dropped a poison entry of %s (%s): %r", list_name, problem, item[:200])
        else:
            self.quarantine.entry(item, list_name, problem, task_id)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # kombu 5.7 (kombu/transport/redis.py, Channel._connparams, reached from
        # conn_or_acquire -> _create_client -> pool) reads ``self.connection.client.hostname``,
        # but a channel outlives its connection: kombu's Connection._do_close_transport sets
        # the transport's client to None, and Transport.close_channel sets the channel's
        # connection to None. After a Redis outage Celery's consumer closes the old connection;
        # its channel's close (restoring unacked messages) or a late ack on it then asks for a
        # new pool, and the AttributeError that followed is not a connection error, so it
        # ended the worker. A connection error is what it is: Celery logs it ("Couldn't ack")
        # and reconnects; the messages stay in Redis's unacked hash and come back after the
        # visibility timeout.
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def serve_redis_urls(quarantine: Quarantine) -> None:
    """Make :class:`Transport` the transport of ``redis://`` and ``rediss://`` URLs in this
    process, through kombu's registry of URL schemes (so URLs, logs and TLS set-up stay as
    they are), its channels handing poison entries to ``quarantine``."""
    Channel.quarantine = quarantine
    for scheme in ("redis", "rediss"):
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu.transport._transport_cache.pop(scheme, None)  # resolved before: resolve again
