"""Real infrastructure for the reliability tests and the soak: private Redis servers, a counter
of result writes, images and small waiting helpers. Nothing here stands in for Redis or Celery.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = os.environ.get("VLMQ_TEST_REDIS_SERVER", "redis-server")
RESULT_CHANNELS = "celery-task-meta-*"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_persistence_args(compose_file: Path = ROOT / "compose.yaml") -> list[str]:
    """The persistence options (``--appendonly``, ``--appendfsync``, ``--save``, ...) that
    ``compose.yaml`` gives its Redis, so the tests run Redis exactly as deployed."""
    command = yaml.safe_load(compose_file.read_text())["services"]["redis"]["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    persistence = ("--appendonly", "--appendfsync", "--save", "--aof-use-rdb-preamble")
    args: list[str] = []
    for i, arg in enumerate(command):
        if arg in persistence:
            args += [arg, command[i + 1]]
    return args


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=vlmq test CA", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return TlsFiles(ca=ca, cert=cert, key=key)


class RedisServer:
    """A private ``redis-server`` on a free port with its data in ``directory``, persisted
    as ``compose.yaml`` persists it; it can be killed and started again on the same data."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: TlsFiles | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/{db}"
        return (
            f"rediss://{auth}127.0.0.1:{self.port}/{db}"
            f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"
        )

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url())

    def start(self) -> None:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.directory)]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
                     "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                     "--tls-ca-cert-file", str(self.tls.ca)]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += compose_persistence_args() + list(self.extra_args)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._answers, 20, f"redis-server on port {self.port} did not start")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"redis-server exited: {(self.directory / 'redis.log').read_text()}"
            )
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no final fsync; only what was already persisted stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ResultWrites:
    """Counts every result the Redis backend stores: its ``set`` also PUBLISHes the value on
    the key's channel, so one message here is one write of ``celery-task-meta-<id>``."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._states: defaultdict[str, list[str]] = defaultdict(list)
        self._order: list[str] = []
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="result-writes", daemon=True)
        self._thread.start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"could not subscribe to {RESULT_CHANNELS}")

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self._url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(RESULT_CHANNELS)
                self._subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message["type"] == "pmessage":
                        self._record(message["channel"], message["data"])
            except redis.ConnectionError:
                time.sleep(0.2)  # Redis restarting: subscribe again once it answers
            finally:
                pubsub.close()
                client.close()

    def _record(self, channel: bytes, data: bytes) -> None:
        task_id = channel.decode().removeprefix("celery-task-meta-")
        status = json.loads(data).get("status", "?")
        with self._lock:
            self._counts[task_id] += 1
            self._states[task_id].append(status)
            self._order.append(task_id)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def settled(self, ids: list[str], timeout_s: float = 10.0) -> Counter[str]:
        """The counts once every id in ``ids`` has been seen written (this subscriber may lag
        a moment behind the client that already has the result), and a little later for any
        second write."""
        wait_for(lambda: all(self.counts()[i] for i in ids), timeout_s, "writes not all seen")
        time.sleep(0.3)
        return self.counts()

    def states(self, task_id: str) -> list[str]:
        with self._lock:
            return list(self._states[task_id])

    def order(self) -> list[str]:
        """Task ids in the order their results were written."""
        with self._lock:
            return list(self._order)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_for(
    predicate: Callable[[], object], timeout_s: float, message: str, poll_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"{message} (after {timeout_s:g} s)")


def image(i: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct small RGB image per ``i`` (distinct bytes, so distinct claim-check keys)."""
    return Image.new("RGB", size, (i % 256, (i // 256) % 256, 77))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def unacked_count(client: redis.Redis) -> int:
    """Messages delivered to a worker and not yet acknowledged (kombu's ``unacked`` hash)."""
    return int(client.hlen("unacked"))


def unacked_task_ids(client: redis.Redis) -> set[str]:
    """The task ids of the messages in kombu's ``unacked`` hash."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}
