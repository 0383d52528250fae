"""The worker's kombu Redis channel: which entries it quarantines, and a channel of a closed
connection failing with a connection error (kombu 5.7 raised AttributeError there)."""

from __future__ import annotations

import base64
import json

import pytest
from kombu import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.transport import Transport, decode_entry

BODY = base64.b64encode(json.dumps([[], {"question": "Hi?"}, {}]).encode()).decode()
GOOD = {
    "body": BODY,
    "content-type": "application/json",
    "content-encoding": "utf-8",
    "headers": {"task": "vlmq.analyze", "id": "t-1"},
    "properties": {
        "delivery_tag": "tag-1",
        "delivery_info": {"exchange": "", "routing_key": "vlmq"},
        "body_encoding": "base64",
        "priority": 0,
    },
}


def variant(path: list[str], value: object) -> bytes:
    entry = json.loads(json.dumps(GOOD))
    node = entry
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(entry).encode()


def test_a_real_envelope_is_delivered():
    payload, problem = decode_entry(json.dumps(GOOD).encode())
    assert problem is None and payload == GOOD


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\x80\x81 not json", "not UTF-8 JSON"),
        (b'{"body": "caf\xe9"}', "not UTF-8 JSON"),  # kombu would replace the byte and go on
        (b"[1, 2]", "JSON list"),
        (b"[" * 100_000, "not UTF-8 JSON"),
        (variant(["properties"], None), "'properties'"),
        (variant(["properties", "delivery_tag"], 7), "delivery_tag"),
        (b'{"properties": {"delivery_tag": "\\ud83d"}}', "delivery_tag"),  # a lone surrogate
        (variant(["properties", "delivery_info"], {"exchange": ""}), "routing_key"),
        (variant(["headers"], [1]), "headers"),
        (variant(["headers", "compression"], "zlib"), "compressed"),
        (variant(["content-type"], 3), "content-type"),
        (variant(["body"], None), "body is not a string"),
        (variant(["properties", "body_encoding"], "rot13"), "body_encoding"),
        (variant(["body"], "not base64!"), "base64"),
    ],
)
def test_entries_that_are_not_kombu_messages_are_refused(raw: bytes, says: str):
    payload, problem = decode_entry(raw)
    assert payload is None and says in problem


@pytest.mark.parametrize("closed", ["transport", "channel"])
def test_a_channel_of_a_closed_connection_raises_a_connection_error(redis_url: str, closed: str):
    connection = Connection(redis_url, transport=Transport)
    channel = connection.channel()
    if closed == "transport":  # as kombu's Connection._do_close_transport leaves it
        channel.connection.client = None
    else:  # closed with its connection: its transport is gone
        connection.close()
    channel._pool = None  # as after the channel's own close: the next client needs a pool
    with pytest.raises(RedisConnectionError, match="closed"):
        channel._connparams()
    connection.close()
