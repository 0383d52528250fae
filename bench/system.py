"""Modes (d) and (d2), the whole system: the load generator process -> Redis -> ``celery -A
worker.app worker`` process (its default engine: continuous), or for (d2) ``vlmq worker --gpus``
(a supervisor with one pinned worker per GPU), all started here and always stopped here."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.drive import RunLog
from bench.progress import Progress, log
from worker.cli import celery_worker_argv

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SystemConfig:
    """How to start the worker, and where its logs and the load generator's records go."""

    redis_url: str
    model_dir: Path
    device: str
    precision: str
    max_batch: int
    max_wait_ms: int
    out_dir: Path
    tag: str = "d"
    engine: str = "continuous"  # VLMQ_ENGINE
    max_new_tokens: int | None = None  # VLMQ_MAX_NEW_TOKENS: sizes the engine's slots
    padding_tiles: str = "encode"  # VLMQ_PADDING_TILES
    gpu_memory_gib: int = 0  # VLMQ_GPU_MEMORY_GIB
    gpus: tuple[str, ...] = ()  # set: ``vlmq worker --gpus`` (one worker per GPU), else one


class WorkerProcess:
    """A ``celery -A worker.app worker`` subprocess, or with ``config.gpus`` the ``vlmq worker
    --gpus`` supervisor and its workers (one process group), logging to a file."""

    def __init__(self, config: SystemConfig) -> None:
        self.config = config
        self.log_path = config.out_dir / f"worker-{config.tag}.log"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self._log_file = None

    def start(self) -> None:
        c = self.config
        env = {
            **os.environ,
            "REDIS_URL": c.redis_url,
            "VLMQ_MODEL": str(c.model_dir),
            "VLMQ_DEVICE": c.device,
            "VLMQ_PRECISION": c.precision,
            "VLMQ_MAX_BATCH_SIZE": str(c.max_batch),
            "VLMQ_MAX_WAIT_MS": str(c.max_wait_ms),
            "VLMQ_ENGINE": c.engine,
            "VLMQ_PADDING_TILES": c.padding_tiles,
            "VLMQ_GPU_MEMORY_GIB": str(c.gpu_memory_gib),
            "VLMQ_WARMUP": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        env.pop("VLMQ_GPU", None)
        if c.max_new_tokens is not None:
            env["VLMQ_MAX_NEW_TOKENS"] = str(c.max_new_tokens)
        quiet = ["--without-mingle", "--without-gossip"]
        if c.gpus:  # `vlmq worker --gpus ...`: the worker's own command, one worker per GPU
            argv = [
                sys.executable, "-m", "worker", "worker", "--gpus", ",".join(c.gpus),
                "--loglevel", "INFO", "--", *quiet,
            ]  # fmt: skip
        else:
            argv = celery_worker_argv(
                loglevel="INFO", node=f"vlmq-bench-{os.getpid()}@%h", extra=quiet
            )
        self._log_file = self.log_path.open("wb")
        self.started = time.monotonic()
        # Its own process group: the last resort of stop() kills every worker of it.
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop, 5.0)
        log(f"({c.tag}) worker started (pid {self.proc.pid}), log {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ready_nodes(self) -> list[str]:
        """The node names that logged ``ready.`` so far."""
        return re.findall(r"(\S+@\S+) ready\.", self.log_text())

    def expected_workers(self) -> int:
        return max(1, len(self.config.gpus))

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start until every worker says ``ready.`` (model loaded and warmed up)."""
        assert self.proc is not None
        tag, want = self.config.tag, self.expected_workers()
        progress = Progress(f"({tag}) workers loading", want, every_s=15.0)
        deadline = time.monotonic() + timeout_s
        last_note = time.monotonic()
        seen = 0
        while time.monotonic() < deadline:
            ready = len(set(self.ready_nodes()))
            if ready > seen:
                progress.advance(ready - seen)
                seen = ready
            if ready >= want:
                progress.close()
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with {self.proc.returncode} before it was ready; "
                    f"log tail:\n{self.tail()}"
                )
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                log(f"({tag}) {ready}/{want} workers ready "
                    f"({time.monotonic() - self.started:.0f} s)")  # fmt: skip
            time.sleep(0.2)
        raise TimeoutError(
            f"{seen}/{want} workers were ready after {timeout_s:.0f} s:\n{self.tail()}"
        )

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def timings(self) -> dict[str, float | int | None]:
        """What the worker logged of its start: model load, engine (slots, length, graph
        capture) and warm-up."""
        text = self.log_text()

        def find(pattern: str, group: int = 1, kind: type = float) -> float | int | None:
            match = re.search(pattern, text)
            return kind(match.group(group)) if match else None

        engine = r"Engine ready in ([0-9.]+) s: (\d+) slots of (\d+) tokens"
        return {
            "load_s": find(r"Loaded .* in ([0-9.]+) s"),
            "engine_s": find(engine),
            "slots": find(engine, 2, int),
            "max_seq_len": find(engine, 3, int),
            "graphs": find(r"captured (\d+) decode graphs", 1, int),
            "graph_capture_s": find(r"captured \d+ decode graphs .* in ([0-9.]+) s"),
            "warmup_s": find(r"Warmed up in ([0-9.]+) s"),
        }

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Warm shutdown (SIGTERM; the supervisor forwards it to its workers), then SIGKILL
        to the whole process group after ``timeout_s`` or if a worker outlives the
        supervisor; idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid)
                self.proc.wait()
        give_up = time.monotonic() + 5.0
        while _group_alive(self.proc.pid) and time.monotonic() < give_up:
            time.sleep(0.1)
        if _group_alive(self.proc.pid):
            log(f"({self.config.tag}) a worker outlived the supervisor: killing its group")
            _kill_group(self.proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def flush_redis(url: str) -> None:
    """Empty the bench's Redis database (fails clearly when no Redis answers)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RuntimeError(f"no Redis answers at {url} ({exc}); start one (`make redis`)") from exc
    client.flushdb()
    client.close()


def run_loadgen(
    config: SystemConfig,
    workload: dict,
    runs: list[dict],
    *,
    stop_at: float,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
) -> tuple[list[RunLog], dict | None]:
    """Run the load generator process to the end (or ``stop_at``, epoch, or the worker's
    death) and parse what it recorded: the runs, and the batch-1 probe if one was asked."""
    cfg_path = config.out_dir / f"loadgen-{config.tag}.json"
    rec_path = config.out_dir / f"loadgen-{config.tag}.jsonl"
    rec_path.unlink(missing_ok=True)
    cfg_path.write_text(
        json.dumps(
            {
                "redis_url": config.redis_url,
                "workload": workload,
                "runs": runs,
                "timeout_s": timeout_s,
            }
        )
    )
    total = sum(r.get("n", 0) if r["schedule"] != "probe" else 6 for r in runs)
    progress = Progress(f"({config.tag}) requests", total)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with (config.out_dir / f"loadgen-{config.tag}.log").open("wb") as lg_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", str(cfg_path), str(rec_path)],
            cwd=ROOT,
            env=env,
            stdout=lg_log,
            stderr=subprocess.STDOUT,
        )
        seen = 0
        try:
            while proc.poll() is None:
                if time.time() > stop_at or not alive():
                    why = "deadline reached" if alive() else "the worker died"
                    log(f"({config.tag}) {why}: stopping the load generator")
                    proc.terminate()
                    proc.wait(10)
                    break
                time.sleep(0.5)
                now = _count_records(rec_path)
                if now > seen:
                    progress.advance(now - seen)
                    seen = now
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    progress.close()
    if proc.returncode not in (0, None, -signal.SIGTERM):
        log(
            f"({config.tag}) load generator exited with {proc.returncode}; "
            f"see loadgen-{config.tag}.log"
        )
    return parse_records(rec_path)


def _count_records(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if b'"event": "record"' in line)
    except OSError:
        return 0


def parse_records(path: Path) -> tuple[list[RunLog], dict | None]:
    """Turn the load generator's JSON lines into run logs (batches rebuilt from the
    results' ``queued_ms``/``gpu_ms``) and the probe's step time."""
    runs: dict[str, RunLog] = {}
    probe_records: list[dict] = []
    if not path.exists():
        return [], None
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        name = event.get("run")
        if event["event"] == "run_start":
            c = event["config"]
            runs[name] = RunLog(
                name=name,
                schedule=c["schedule"],
                rate=c.get("rate"),
                concurrency=c.get("concurrency"),
                n_planned=c.get("n", 0),
                t0=event["t"],
                windowed=c["schedule"] == "closed" and c.get("window_s") is not None,
            )
        elif event["event"] == "run_end" and name in runs:
            runs[name].t1 = event["t"]
            if runs[name].windowed and event.get("arrived") is not None:
                runs[name].n_planned = event["arrived"]
        elif event["event"] == "record" and name in runs:
            if runs[name].schedule == "probe":
                probe_records.append(event)
                continue
            runs[name].records.append(event)
    out = []
    for run in runs.values():
        if run.schedule == "probe":
            continue
        if not run.t1:
            run.t1 = max((r["end"] for r in run.records), default=run.t0)
        batches = {}
        for r in run.records:
            if r.get("error") is None and r.get("gpu_ms") is not None:
                start = r["submitted"] + r["queued_ms"] / 1000.0
                key = (r["batch_size"], round(r["gpu_ms"], 3))
                batches.setdefault(key, [start, start + r["gpu_ms"] / 1000.0, r["batch_size"]])
                r["start"] = batches[key][0]
        run.batches = sorted(batches.values())
        run.stopped_early = len(run.records) < run.n_planned
        out.append(run)
    return out, _probe(probe_records)


def _probe(records: list[dict]) -> dict | None:
    ok = [r for r in records if r.get("error") is None]
    lone = [r for r in ok if r.get("lone")]
    ok = [r for r in ok if not r.get("lone")]
    one = [r for r in ok if r["expected_tokens"] == 1]
    many = [r for r in ok if r["expected_tokens"] > 1]
    if not one or not many:
        return None
    k = many[0]["expected_tokens"] - 1
    e2e_one = min(r["end"] - r["arrival"] for r in one)
    e2e_many = min(r["end"] - r["arrival"] for r in many)
    gpu_one = min(r["gpu_ms"] for r in one)
    gpu_many = min(r["gpu_ms"] for r in many)
    return {
        "first_token_ms": e2e_one * 1000.0,
        "step_ms": (gpu_many - gpu_one) / k,
        "step_ms_e2e": (e2e_many - e2e_one) * 1000.0 / k,
        "k": k,
        "lone_s": sum(r["end"] - r["arrival"] for r in lone) / len(lone) if lone else None,
    }
