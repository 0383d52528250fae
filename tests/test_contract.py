"""The wire contract of docs/contract.md: its JSON Schemas match the code and real traffic,
and a producer written in another language (Node.js, tests/contract/enqueue.cjs) gets its
answers and its named errors from a real worker."""

import base64
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import redis
from PIL import Image

from producer import Client, InvalidImage, Settings
from producer.protocol import AnalysisRequest, Limits
from producer.results import AnalysisResult

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schema"
NODE_CLIENT = ROOT / "tests" / "contract"


def schema(name: str) -> jsonschema.Draft202012Validator:
    loaded = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return jsonschema.Draft202012Validator(loaded)


KWARGS, RESULT = schema("task-kwargs.json"), schema("result.json")


def test_the_schemas_name_what_the_code_sends_and_stores():
    fields = [f.name for f in dataclasses.fields(AnalysisRequest)]
    assert KWARGS.schema["required"] == fields == list(KWARGS.schema["properties"])
    limits = Limits()
    properties = KWARGS.schema["properties"]
    assert properties["question"]["maxLength"] == limits.max_question_chars
    assert properties["max_new_tokens"]["maximum"] == limits.max_new_tokens
    analysis = RESULT.schema["$defs"]["analysis"]
    stored = [f.name for f in dataclasses.fields(AnalysisResult) if f.name != "task_id"]
    assert analysis["required"] == stored
    bad = [{"question": 5}, {"question": "<|image|> What?"}, {"max_new_tokens": 0},
           {"top_p": 0}, {"image_key": "vlmq:image:abc"}, {"extra": 1}]  # fmt: skip
    good = AnalysisRequest(image_key="vlmq:image:" + "0" * 64, question="What?").to_message()
    KWARGS.validate(good)
    for change in bad:
        assert not KWARGS.is_valid({**good, **change}), change
    assert not KWARGS.is_valid({**good, "question": "  "})


@pytest.mark.integration
def test_messages_python_sends_match_the_documented_format(redis_url: str):
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    client.submit(Image.new("RGB", (8, 8)), "What?", model="tiny.fp32", priority=3)
    r = redis.Redis.from_url(redis_url)
    (key,) = [k for k in r.keys("vlmq.tiny.fp32*") if r.type(k) == b"list"]
    assert key == b"vlmq.tiny.fp32\x06\x163"  # priority 3: the list <queue>\x06\x163
    envelope = json.loads(r.lindex(key, 0))
    assert envelope["headers"]["task"] == "vlmq.analyze"
    assert envelope["properties"]["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == []
    KWARGS.validate(kwargs)
    assert r.exists(kwargs["image_key"])
    client.close()


def node_client() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_CLIENT / "node_modules" / "redis").is_dir():
        pytest.fail(
            "the contract test needs Node.js and its redis package: install nodejs and npm, "
            "then `npm ci --prefix tests/contract` (.ci/run does)"
        )
    return node


@pytest.mark.integration
def test_a_node_producer_gets_answers_and_named_errors(
    start_worker, redis_url: str, tmp_path: Path
):
    node = node_client()
    start_worker()
    good, bad = tmp_path / "cat.png", tmp_path / "broken.png"
    Image.new("RGB", (48, 32), (200, 120, 40)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    done = subprocess.run(
        [node, NODE_CLIENT / "enqueue.cjs", redis_url, "What is this?", good, bad],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answered, failed = (json.loads(line) for line in done.stdout.splitlines())
    for task in (answered, failed):
        KWARGS.validate(task["kwargs"])
        RESULT.validate(task["meta"])
    assert answered["meta"]["status"] == "SUCCESS"
    assert answered["meta"]["result"]["answer_tokens"] >= 1
    assert failed["meta"]["status"] == "FAILURE"
    assert failed["meta"]["result"]["exc_type"] == "InvalidImage"
    # The Python client reads the same stored outcomes.
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    assert client.handle(answered["task_id"]).result(timeout=5).answer_tokens >= 1
    with pytest.raises(InvalidImage):
        client.handle(failed["task_id"]).result(timeout=5)
    client.close()
