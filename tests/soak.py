"""Soak: many tasks through two real CPU workers on the tiny model, with 1% malformed requests
and a worker killed (SIGKILL) and restarted in the middle; every task must be accounted for.

    python tests/soak.py --tasks 10000        # the full form; docs/soak.md has its last result
    python tests/soak.py --tasks 10000 --random-kills 10   # and SIGKILLs at random moments

It starts its own ``redis-server`` (persisted as compose.yaml persists it) and its own workers,
and prints one line of counts; the exit status is 0 only if no task was lost, none failed with
anything but its expected named error, and no result was written twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from conftest import ROOT, WorkerProcess
from reliability_support import RedisServer, ResultWrites, image, png_bytes

from producer.claimcheck import ImageStore
from producer.client import Client
from producer.config import Settings, make_celery_app
from producer.keys import LEDGER_RESENT
from producer.protocol import TASK_NAME, AnalysisRequest

VISIBILITY_S = 30  # above what the start-up check asks for, even on two busy cores
WORKER_ENV = {
    "VLMQ_DEVICE": "cpu",
    "VLMQ_PRECISION": "fp32",
    "VLMQ_MAX_BATCH_SIZE": "8",
    "VLMQ_MAX_WAIT_MS": "50",
    "VLMQ_MAX_NEW_TOKENS": "16",
    "VLMQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "VLMQ_SWEEP_INTERVAL_S": "5",  # a message lost with a killed worker comes back in ~50 s
    "OMP_NUM_THREADS": "1",  # two workers on two cores; spinning threads would swing timings
}


@dataclass
class SoakResult:
    tasks: int = 0
    malformed: int = 0
    succeeded: int = 0
    failed_as_expected: int = 0
    failed_otherwise: int = 0
    lost: int = 0
    written_twice: int = 0
    ran_again_after_kill: int = 0
    killed_at_results: int = 0
    random_kills: int = 0
    resent_by_sweeper: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        accounted = self.succeeded + self.failed_as_expected + self.failed_otherwise + self.lost
        return (
            self.lost == 0
            and self.failed_otherwise == 0
            and self.written_twice == 0
            and accounted == self.tasks
        )

    def line(self) -> str:
        counts = asdict(self)
        counts["tasks_per_s"] = round(self.tasks / self.seconds, 1) if self.seconds else 0
        counts["ok"] = self.ok
        return "soak " + json.dumps(counts)


def malformed_kwargs(store: ImageStore, rng: random.Random) -> tuple[dict, str]:
    """A message a buggy or hostile producer could send, and the named error it must end in."""
    good = AnalysisRequest(
        image_key=store.put(png_bytes(image(0))), question="What is this?", max_new_tokens=2
    ).to_message()
    junk = bytes(rng.getrandbits(8) for _ in range(64))
    choices = [
        ({**good, "image_key": store.put(b"not an image " + junk)}, "InvalidImage"),
        ({**good, "image_key": store.put(png_bytes(image(1))[:50])}, "InvalidImage"),
        ({**good, "image_key": "vlmq:image:" + "0" * 64}, "ImageUnavailable"),
        ({**good, "question": ""}, "InvalidRequest"),
        ({**good, "question": "?" * 100_000}, "InvalidRequest"),
        ({**good, "max_new_tokens": -3}, "InvalidRequest"),
        ({**good, "temperature": "hot"}, "InvalidRequest"),
        ({**good, "surprise": True}, "InvalidRequest"),
    ]
    return rng.choice(choices)


def run(
    tasks: int,
    *,
    malformed_fraction: float = 0.01,
    seed: int = 1,
    random_kills: int = 0,
    log=print,
) -> SoakResult:
    workdir = Path(tempfile.mkdtemp(prefix="vlmq-soak-"))
    from worker.model.tiny import make_tiny_model

    model_dir = make_tiny_model(workdir / "model")
    server = RedisServer(workdir / "redis")
    server.start()
    url = server.url()
    env = {**os.environ, **WORKER_ENV, "REDIS_URL": url, "VLMQ_MODEL": str(model_dir)}
    env["PYTHONPATH"] = str(ROOT)
    workers: list[WorkerProcess] = []

    def start(index: int) -> WorkerProcess:
        worker = WorkerProcess(
            env, workdir / f"worker{len(workers)}.log", f"soak{index}-{uuid.uuid4().hex[:6]}@%h"
        )
        workers.append(worker)
        worker.wait_ready()
        return worker

    writes = ResultWrites(url)
    result = SoakResult(tasks=tasks)
    try:
        live = [start(0), start(1)]
        settings = Settings(redis_url=url, visibility_timeout_s=VISIBILITY_S)
        client = Client(settings)
        app = make_celery_app(settings)
        store = ImageStore(redis.Redis.from_url(url), settings.image_ttl_s)
        expected: dict[str, str | None] = {}
        t0 = time.monotonic()

        def submit_chunk(start_index: int) -> list[tuple[str, str | None]]:
            rng = random.Random(seed * 1_000_003 + start_index)  # one per chunk: threads
            sent = []
            items = []
            for i in range(start_index, min(start_index + 100, tasks)):
                if rng.random() < malformed_fraction:
                    kwargs, error = malformed_kwargs(store, rng)
                    sent.append((app.send_task(TASK_NAME, kwargs=kwargs).id, error))
                else:
                    items.append(
                        {
                            "image": image(i),
                            "question": f"Soak {i}: what is shown?",
                            "max_new_tokens": 1 + i % 4,
                        }
                    )
            sent += [(h.id, None) for h in client.submit_many(items)] if items else []
            return sent

        def submit(first: int, last: int) -> None:
            with ThreadPoolExecutor(4) as pool:
                for chunk in pool.map(submit_chunk, range(first, last, 100)):
                    expected.update(chunk)

        r = redis.Redis.from_url(url)
        backend = app.backend
        final: dict[str, dict] = {}

        def poll() -> None:
            pending = [i for i in expected if i not in final]
            for offset in range(0, len(pending), 500):
                chunk = pending[offset : offset + 500]
                raw = r.mget([backend.get_key_for_task(i) for i in chunk])
                for task_id, value in zip(chunk, raw, strict=True):
                    if value:
                        meta = backend.decode_result(value)
                        if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                            final[task_id] = meta

        half = (tasks // 2) // 100 * 100
        submit(0, half)
        # The kill comes once the first half is all taken from the queue, while the workers
        # still hold the last of it: a kill while a worker is fetching could lose the one
        # message Redis has just handed over (see README, limits).
        while r.llen(settings.queue):
            time.sleep(0.01)
        victim = live.pop(1)
        victim.stop(signal.SIGKILL)
        poll()
        result.killed_at_results = len(final)
        log(f"soak: SIGKILL {victim.name} at {len(final)} of {half} results; restarting it")
        live.append(start(1))

        def kill_at_random() -> None:
            # Whatever the worker is doing, fetching included: the sweeper must bring back a
            # message lost in kombu's BRPOP-then-unacked window.
            rng = random.Random(seed)
            for _ in range(random_kills):
                time.sleep(rng.uniform(1.0, 4.0))
                if not r.llen(settings.queue):
                    break
                index = rng.randrange(len(live))
                live.pop(index).stop(signal.SIGKILL)
                result.random_kills += 1
                live.insert(index, start(index))

        killer = threading.Thread(target=kill_at_random, daemon=True)
        killer.start()
        submit(half, tasks)
        killer.join()
        result.malformed = sum(error is not None for error in expected.values())
        log(f"soak: {tasks} tasks submitted in {time.monotonic() - t0:.1f} s")

        deadline = time.monotonic() + max(120.0, tasks / 10)
        while len(final) < len(expected) and time.monotonic() < deadline:
            poll()
            time.sleep(0.5)
        result.seconds = round(time.monotonic() - t0, 1)
        result.resent_by_sweeper = int(r.get(LEDGER_RESENT) or 0)
        time.sleep(1.0)  # let the last publishes reach the write counter

        counts = writes.counts()
        errors: Counter[str] = Counter()
        for task_id, wanted in expected.items():
            meta = final.get(task_id)
            if meta is None:
                result.lost += 1
                continue
            if counts[task_id] > 1:
                result.written_twice += 1
            if int(r.get(f"vlmq:attempts:{task_id}") or 0) > 1:
                result.ran_again_after_kill += 1
            if meta["status"] == "SUCCESS" and wanted is None:
                result.succeeded += 1
                continue
            # decode_result has rebuilt a failure into its exception.
            failure = meta.get("result")
            got = type(failure).__name__ if isinstance(failure, Exception) else meta["status"]
            errors[got] += 1
            if got == wanted:
                result.failed_as_expected += 1
            else:
                result.failed_otherwise += 1
                log(f"soak: {task_id} ended {got}, expected {wanted or 'SUCCESS'}: {meta}")
        result.errors = dict(errors)
    finally:
        writes.close()
        for worker in workers:
            worker.stop()
        server.stop()
    log(result.line())
    if not result.ok:
        log(f"soak: worker logs are in {workdir}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--malformed", type=float, default=0.01, help="fraction malformed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--random-kills",
        type=int,
        default=0,
        help="also SIGKILL a worker (and start it again) this many times at random moments "
        "while tasks are queued",
    )
    args = parser.parse_args(argv)
    kills = args.random_kills
    result = run(args.tasks, malformed_fraction=args.malformed, seed=args.seed, random_kills=kills)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
