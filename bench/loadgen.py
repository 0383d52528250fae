"""The load generator of mode (d), in its own process: ``python -m bench.loadgen CONFIG OUT``.

It submits the workload through :class:`producer.client.Client` (claim check in Redis, task
on the broker) and waits for each answer, then appends one JSON line per request to ``OUT``
as it finishes, so a crash leaves everything measured so far. No torch here.

CONFIG (JSON): ``redis_url``, ``workload`` (:class:`bench.workload.Workload` fields),
``timeout_s`` and ``runs``, each ``{"name", "schedule": "probe"|"closed"|"poisson", "n",
"start", "concurrency", "rate", "max_s", "window_s", "k", "repeats", "lone_tokens"}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.workload import RequestSpec, Workload, poisson_arrivals
from producer.client import Client
from producer.config import Settings
from producer.protocol import Limits


class Recorder:
    """Appends JSON lines, one writer at a time, flushed each time."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        with self._lock:
            self._file.write(json.dumps(fields) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def one_request(
    client: Client,
    spec: RequestSpec,
    data: bytes,
    arrival: float,
    timeout_s: float,
    out: Recorder,
    run: str,
    answer_tokens: int | None = None,
    **extra: Any,
) -> None:
    """Submit one request and wait for its answer; record it whatever happens."""
    expected = spec.answer_tokens if answer_tokens is None else answer_tokens
    record: dict[str, Any] = {
        "event": "record",
        "run": run,
        "index": spec.index,
        "tiles": spec.tiles,
        "expected_tokens": expected,
        "arrival": arrival,
        **extra,
    }
    try:
        record["submitted"] = time.time()
        handle = client.submit(data, spec.question, max_new_tokens=expected, temperature=0.0)
        result = handle.result(timeout=timeout_s)
        record.update(
            end=time.time(),
            answer_tokens=result.answer_tokens,
            prompt_tokens=result.prompt_tokens,
            batch_size=result.timings.batch_size,
            queued_ms=result.timings.queued_ms,
            gpu_ms=result.timings.gpu_ms,
            worker=_worker_of(handle),
            error=None,
        )
    except Exception as exc:
        record.update(end=time.time(), error=f"{type(exc).__name__}: {exc}")
    out.write(**record)


def _worker_of(handle: Any) -> str | None:
    """The node that ran the task: the result backend's ``worker`` field (extended results)."""
    try:
        return handle._async.worker
    except Exception:
        return None


def run_closed(
    client: Client, specs: list[RequestSpec], images: list[bytes], cfg: dict, out: Recorder
) -> int:
    """``concurrency`` clients, each submitting its next request when its last is answered,
    for at most ``window_s`` seconds of submissions; returns how many were submitted."""
    stop_at = time.time() + min(cfg["max_s"], cfg.get("window_s") or cfg["max_s"])
    lock = threading.Lock()
    cursor = iter(range(len(specs)))
    submitted = [0]

    def client_loop() -> None:
        while time.time() < stop_at:
            with lock:
                i = next(cursor, None)
                if i is None:
                    return
                submitted[0] += 1
            one_request(
                client, specs[i], images[i], time.time(), cfg["timeout_s"], out, cfg["name"]
            )

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(cfg["concurrency"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return submitted[0]


def run_poisson(
    client: Client, specs: list[RequestSpec], images: list[bytes], cfg: dict, out: Recorder
) -> None:
    """Submit at Poisson arrival times; a pool thread per request in flight waits for it."""
    offsets = poisson_arrivals(len(specs), cfg["rate"], cfg.get("seed", 0))
    t0 = time.time()
    stop_at = t0 + cfg["max_s"]
    with ThreadPoolExecutor(max_workers=min(256, max(1, len(specs)))) as pool:
        for spec, data, offset in zip(specs, images, offsets, strict=True):
            arrival = t0 + offset
            if arrival >= stop_at:
                break
            time.sleep(max(0.0, arrival - time.time()))
            pool.submit(
                one_request, client, spec, data, arrival, cfg["timeout_s"], out, cfg["name"]
            )


def run_probe(
    client: Client, spec: RequestSpec, workload: Workload, cfg: dict, out: Recorder
) -> None:
    """One request at a time with answers of 1 and ``1 + k`` tokens, ``repeats`` times each,
    then ``repeats`` lone requests of ``lone_tokens`` (if given). Each has its own image, so
    the engine cannot reuse an image's cross-attention cache."""
    repeats = cfg.get("repeats", 2)
    plan = [(1, False)] * repeats + [(1 + cfg["k"], False)] * repeats
    if cfg.get("lone_tokens"):
        plan += [(cfg["lone_tokens"], True)] * repeats
    images = [
        workload.image_bytes(dataclasses.replace(spec, image_seed=spec.image_seed + 1 + i))
        for i in range(len(plan))
    ]
    for (tokens, lone), data in zip(plan, images, strict=True):
        one_request(
            client, spec, data, time.time(), cfg["timeout_s"], out, cfg["name"], tokens, lone=lone
        )


def main(argv: list[str] | None = None) -> int:
    """Run every run of CONFIG in order, recording to OUT."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.loadgen CONFIG.json OUT.jsonl", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    out = Recorder(Path(argv[1]))
    workload = Workload(**config["workload"])
    client = Client(Settings.from_env({"REDIS_URL": config["redis_url"]}), limits=Limits())
    try:
        for run in config["runs"]:
            run = {"timeout_s": config["timeout_s"], **run}
            if run["schedule"] == "probe":
                specs = [workload.request(run.get("index", 0))]
                images = []
            else:
                specs = workload.requests(run["n"], start=run.get("start", 0))
                images = [workload.image_bytes(spec) for spec in specs]
            out.write(event="run_start", run=run["name"], t=time.time(), config=run)
            arrived = None
            if run["schedule"] == "probe":
                run_probe(client, specs[0], workload, run, out)
            elif run["schedule"] == "closed":
                arrived = run_closed(client, specs, images, run, out)
            else:
                run_poisson(client, specs, images, run, out)
            out.write(event="run_end", run=run["name"], t=time.time(), arrived=arrived)
    finally:
        client.close()
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
