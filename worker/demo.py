"""``vlmq demo``: the whole path on the tiny model, on this machine, in under a minute.

Broker, in order of preference: an empty database of the Redis at ``REDIS_URL`` if it
answers (the highest numbered one, emptied again when the demo ends: the demo's keys and queue
bindings never mix with others'); else a private ``redis-server`` started here; else Celery's
in-memory transport with the worker and the producer in this one process. It says which one
it uses and where it wrote.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from producer.claimcheck import MemoryImageStore
from producer.client import Client
from producer.config import Settings
from producer.errors import VlmqError
from worker.cli import celery_worker_argv

TINY_MODEL_DIR = Path(
    os.environ.get("VLMQ_DEMO_MODEL_DIR", "~/.cache/vlmq/tiny-mllama")
).expanduser()
WORKER_ENV = {
    "VLMQ_DEVICE": "cpu",
    "VLMQ_PRECISION": "fp32",
    "VLMQ_MAX_BATCH_SIZE": "8",
    "VLMQ_MAX_WAIT_MS": "300",
}


def sample_images() -> list[tuple[Image.Image, str]]:
    """Ten drawn images with a question each, some in awkward modes on purpose."""
    samples: list[tuple[Image.Image, str]] = []
    colours = ["red", "green", "blue", "orange", "purple", "teal"]
    for i, colour in enumerate(colours):
        img = Image.new("RGB", (320 + 40 * i, 240), "white")
        draw = ImageDraw.Draw(img)
        draw.ellipse((40, 40, 200, 200), fill=colour)
        draw.rectangle((220, 60, 300, 180), outline="black", width=4)
        samples.append((img, f"What colour is the circle in picture {i + 1}?"))
    stripes = Image.new("RGB", (600, 200), "white")
    for x in range(0, 600, 40):
        ImageDraw.Draw(stripes).rectangle((x, 0, x + 19, 200), fill="black")
    samples.append((stripes, "How many stripes are there?"))
    samples.append((Image.new("CMYK", (256, 256), (0, 255, 255, 0)), "Describe this CMYK image."))
    samples.append((stripes.convert("P"), "Is this a palette image?"))
    samples.append((Image.linear_gradient("L").resize((512, 128)), "Which side is brighter?"))
    return samples


def main() -> int:
    from worker.model.tiny import make_tiny_model

    if not (TINY_MODEL_DIR / "config.json").exists():
        print(f"Building the tiny random Mllama in {TINY_MODEL_DIR} ...")
        make_tiny_model(TINY_MODEL_DIR)
    print(f"Model: tiny random Mllama at {TINY_MODEL_DIR} (answers are random text)")
    with _broker() as (mode, redis_url):
        if mode == "memory":
            return _run_in_process()
        with _worker_process(redis_url):
            return _submit_and_print(Client(Settings.from_env({"REDIS_URL": redis_url})))


@contextlib.contextmanager
def _broker() -> Iterator[tuple[str, str]]:
    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.ConnectionError, redis.TimeoutError, ValueError):
        found = "no Redis answers"
    else:
        db = _empty_database(url)
        if db is not None:
            demo_url = _with_database(url, db)
            shown = Settings.from_env({"REDIS_URL": demo_url}).redacted_url
            print(f"Broker: the Redis at {shown} (database {db} was empty; emptied again after)")
            try:
                yield "redis", demo_url
            finally:
                with redis.Redis.from_url(demo_url) as client:
                    removed = client.dbsize()
                    client.flushdb()
                print(f"Removed the demo's {removed} keys from {shown}")
            return
        found = "no database is empty in the Redis"
    binary = shutil.which("redis-server")
    if binary is None:
        print(
            f"Broker: {found} at {url} and there is no redis-server binary, so the "
            "demo falls back to Celery's in-memory transport: worker and producer share "
            "this one process"
        )
        yield "memory", ""
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        print(
            f"Broker: {found} at {url}; started a private embedded redis-server "
            f"on 127.0.0.1:{port} for this demo (gone when it ends)"
        )
        try:
            _wait_for_redis(f"redis://127.0.0.1:{port}/0")
            yield "redis", f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()


@contextlib.contextmanager
def _worker_process(redis_url: str) -> Iterator[None]:
    env = {**os.environ, **WORKER_ENV, "REDIS_URL": redis_url, "VLMQ_MODEL": str(TINY_MODEL_DIR)}
    argv = celery_worker_argv(
        loglevel="WARNING",
        node=f"vlmq-demo-{os.getpid()}@%h",
        extra=["--without-mingle", "--without-gossip"],
    )
    print("Worker: " + " ".join(argv[1:]))
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_worker(proc, redis_url)
            yield
        finally:
            proc.terminate()
            proc.wait(60)


def _run_in_process() -> int:
    from celery.contrib.testing.worker import start_worker

    from worker.celery_app import create_worker_app
    from worker.settings import WorkerSettings

    store = MemoryImageStore()
    settings = Settings.from_env({})
    worker_settings = WorkerSettings.from_env({**WORKER_ENV, "VLMQ_MODEL": str(TINY_MODEL_DIR)})
    app = create_worker_app(settings, worker_settings, image_source=store)
    app.conf.update(broker_url="memory://", result_backend="cache+memory://")
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=60):
        return _submit_and_print(Client(settings, app=app, image_store=store))


def _submit_and_print(client: Client) -> int:
    samples = sample_images()
    t0 = time.perf_counter()
    handles = client.submit_many(
        {"image": img, "question": q, "max_new_tokens": 12} for img, q in samples
    )
    batch_sizes: Counter[int] = Counter()
    failures = 0
    for (_, question), handle in zip(samples, handles, strict=True):
        try:
            result = handle.result(timeout=120)
        except VlmqError as exc:
            failures += 1
            print(f"- {question}\n    FAILED {type(exc).__name__}: {exc}")
            continue
        batch_sizes[result.timings.batch_size] += 1
        print(
            f"- {question}\n    answer: {result.answer!r}\n"
            f"    tokens {result.prompt_tokens}+{result.answer_tokens}, batch of "
            f"{result.timings.batch_size}, queued {result.timings.queued_ms:.0f} ms, "
            f"model {result.timings.gpu_ms:.0f} ms"
        )
    seen = ", ".join(f"{size} (x{n} tasks)" for size, n in sorted(batch_sizes.items()))
    print(
        f"\n{len(samples) - failures}/{len(samples)} answered in "
        f"{time.perf_counter() - t0:.1f} s; batch sizes seen: {seen}"
    )
    return 1 if failures else 0


def _empty_database(url: str) -> int | None:
    """The highest numbered empty database of the Redis at ``url`` (of the 16 it has by
    default), or None."""
    import redis

    for db in range(15, -1, -1):
        try:
            with redis.Redis.from_url(_with_database(url, db), socket_connect_timeout=1) as client:
                if client.dbsize() == 0:
                    return db
        except redis.ResponseError:  # fewer databases configured
            continue
    return None


def _with_database(url: str, db: int) -> str:
    return urllib.parse.urlsplit(url)._replace(path=f"/{db}").geturl()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_redis(url: str, timeout_s: float = 10.0) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_for_worker(proc: subprocess.Popen, redis_url: str, timeout_s: float = 120.0) -> None:
    from producer.config import make_celery_app

    app = make_celery_app(Settings.from_env({"REDIS_URL": redis_url}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo worker exited with {proc.returncode}")
        if app.control.ping(timeout=0.5):
            print("Worker: ready")
            return
    raise SystemExit("the demo worker did not become ready in time")


if __name__ == "__main__":
    sys.exit(main())
