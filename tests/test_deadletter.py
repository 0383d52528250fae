"""The dead-letter list on a real Redis: bounded, raw bytes capped, listed newest first,
replayed onto the queue list an entry came from; and the ``vlmq dead`` commands."""

from __future__ import annotations

import json

import pytest
import redis

from producer.cli import main
from producer.deadletter import MAX_RAW_BYTES, DeadLetter, DeadLetters
from producer.keys import DEAD_LETTERS


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_entries_are_listed_newest_first_and_bounded(r):
    letters = DeadLetters(r, max_entries=5)
    for i in range(8):
        letters.add(DeadLetter.of(f"entry {i}".encode(), f"reason {i}", "vlmq"))
    listed = letters.list()
    assert [x.raw for x in listed] == [f"entry {i}".encode() for i in range(7, 2, -1)]
    assert letters.count() == 5
    assert [x.reason for x in letters.list(2)] == ["reason 7", "reason 6"]
    assert all(x.queue == "vlmq" and x.dead_at > 0 for x in listed)


def test_raw_bytes_are_capped_and_kept_exactly(r):
    letters = DeadLetters(r)
    huge = bytes(range(256)) * (MAX_RAW_BYTES // 128)
    letters.add(DeadLetter.of(huge, "too big", "vlmq", task_id="t-1"))
    (letter,) = letters.list()
    assert letter.raw == huge[:MAX_RAW_BYTES] and letter.size == len(huge)
    assert letter.truncated and letter.task_id == "t-1"
    assert "\\x80" in letter.preview()  # undecodable bytes shown escaped


def test_replay_pushes_the_bytes_back_onto_their_list_and_drops_the_letter(r):
    letters = DeadLetters(r)
    first = DeadLetter.of(b"\xff first", "bad", "vlmq")
    second = DeadLetter.of(b"second", "bad", "vlmq.model\x06\x163")
    letters.add(first)
    letters.add(second)
    assert [x.id for x in letters.replay([first.id])] == [first.id]
    assert r.lrange("vlmq", 0, -1) == [b"\xff first"]
    assert [x.id for x in letters.list()] == [second.id]
    with pytest.raises(ValueError, match="no dead letter"):  # not twice
        letters.replay([first.id])


def test_replay_refuses_unknown_ids_and_cut_entries(r):
    letters = DeadLetters(r)
    cut = DeadLetter.of(b"x" * (MAX_RAW_BYTES + 1), "too big", "vlmq")
    whole = DeadLetter.of(b"whole", "bad", "vlmq")
    letters.add(cut)
    letters.add(whole)
    with pytest.raises(ValueError, match="no dead letter with id nope"):
        letters.replay(["nope"])
    with pytest.raises(ValueError, match="cannot be replayed"):
        letters.replay([cut.id])
    assert [x.id for x in letters.replay()] == [whole.id]  # all: the whole ones only
    assert [x.id for x in letters.list()] == [cut.id]


def test_from_json_refuses_other_json():
    for text in ("{}", "[]", '{"reason": 1}', "not json"):
        with pytest.raises(ValueError):
            DeadLetter.from_json(text)


def test_cli_lists_and_replays(r, redis_url, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", redis_url)
    letter = DeadLetter.of(b'{"a": 1}', "the body is not Celery's", "vlmq", task_id="t-9")
    DeadLetters(r).add(letter)
    assert main(["dead", "list"]) == 0
    out = capsys.readouterr().out
    assert letter.id in out and "task t-9" in out and "not Celery's" in out and '{"a": 1}' in out
    assert main(["dead", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == letter.id
    assert main(["dead", "replay", "unknown"]) == 2
    assert main(["dead", "replay", letter.id]) == 0
    assert "1 replayed" in capsys.readouterr().out
    assert r.lrange("vlmq", 0, -1) == [b'{"a": 1}'] and r.llen(DEAD_LETTERS) == 0
