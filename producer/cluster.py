"""What viewers know about the workers, built from their events alone (pure, no I/O)."""

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.events import BATCH_EVENT, GPU_EVENT


@dataclass(frozen=True)
class WorkerRow:
    """One worker as ``vlmq top`` shows it; ``None`` where the figure is unknown."""

    hostname: str
    online: bool
    gpu_name: str | None
    gpu_util: float | None
    gpu_mem_used: int | None
    gpu_mem_total: int | None
    gpu_power_w: float | None
    gpu_temp_c: float | None
    queue_depth: int | None
    queue_buffered: int | None
    last_batch_size: float | None  # of the last report: mean requests per model step
    mean_batch_size: float | None  # over the window, else since the worker started
    queue_wait_ms: float | None  # of the last report
    slots_in_use: int | None  # requests inside the model after the last report
    tasks_total: int | None
    tasks_failed_total: int | None
    tasks_per_s: float | None  # over the window
    tokens_per_s: float | None  # generated tokens, over the window


@dataclass
class _Worker:
    hostname: str
    last_seen: float = 0.0
    offline: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    # (timestamp, model_steps_total, batch_rows_total, tasks_total, answer_tokens_total)
    totals: deque[tuple[float, float, float, float, float]] = field(default_factory=deque)


class ClusterState:
    """Folds ``worker-*`` events into one row per worker.

    Rates come from the running totals of the periodic ``worker-gpu`` events, so a viewer
    that starts late shows true figures after two samples. A worker is offline after a
    ``worker-offline`` event or ``offline_after_s`` without any event.
    """

    def __init__(self, window_s: float = 10.0, offline_after_s: float = 10.0) -> None:
        self.window_s = window_s
        self.offline_after_s = offline_after_s
        self._workers: dict[str, _Worker] = {}

    def apply(self, event: Mapping[str, Any]) -> None:
        """Fold in one event as Celery's event receiver delivers it (a dict)."""
        kind, hostname = event.get("type", ""), event.get("hostname")
        if not hostname or not kind.startswith("worker-"):
            return
        worker = self._workers.setdefault(hostname, _Worker(hostname))
        worker.last_seen = max(worker.last_seen, _received(event))
        worker.offline = kind == "worker-offline"
        if kind == GPU_EVENT:
            self._apply_sample(worker, event)
        elif kind == BATCH_EVENT:
            worker.figures.update(
                last_batch_size=event.get("batch_size"),
                queue_wait_ms=event.get("queue_wait_ms"),
                slots_in_use=event.get("batch_slots_in_use"),
                queue_buffered=event.get("queue_buffered", worker.figures.get("queue_buffered")),
            )

    def _apply_sample(self, worker: _Worker, event: Mapping[str, Any]) -> None:
        gpu_keys = ("gpu_name", "gpu_util", "gpu_mem_used", "gpu_mem_total", "gpu_power_w",
                    "gpu_temp_c", "queue_depth", "queue_buffered", "model_steps_total",
                    "batch_rows_total", "tasks_total", "tasks_failed_total")  # fmt: skip
        worker.figures.update({key: event.get(key) for key in gpu_keys})
        if "tasks_total" not in event:
            return
        t = float(event.get("timestamp") or _received(event))
        worker.totals.append(
            (t, event.get("model_steps_total", 0), event.get("batch_rows_total", 0),
             event["tasks_total"], event.get("answer_tokens_total", 0))
        )  # fmt: skip
        while len(worker.totals) > 2 and worker.totals[1][0] <= t - self.window_s:
            worker.totals.popleft()

    def rows(self, now: float) -> list[WorkerRow]:
        """Every worker seen, by host name, as of ``now`` (epoch seconds)."""
        return [self._row(w, now) for _, w in sorted(self._workers.items())]

    def _row(self, worker: _Worker, now: float) -> WorkerRow:
        f = worker.figures
        online = not worker.offline and now - worker.last_seen < self.offline_after_s
        tasks_per_s = tokens_per_s = mean_batch = None
        if len(worker.totals) >= 2:
            (t0, s0, r0, n0, k0), (t1, s1, r1, n1, k1) = worker.totals[0], worker.totals[-1]
            if t1 > t0:
                tasks_per_s, tokens_per_s = (n1 - n0) / (t1 - t0), (k1 - k0) / (t1 - t0)
            if s1 > s0:
                mean_batch = (r1 - r0) / (s1 - s0)
        if mean_batch is None and f.get("model_steps_total"):
            mean_batch = f.get("batch_rows_total", 0) / f["model_steps_total"]
        return WorkerRow(
            hostname=worker.hostname,
            online=online,
            gpu_name=f.get("gpu_name"),
            gpu_util=f.get("gpu_util"),
            gpu_mem_used=f.get("gpu_mem_used"),
            gpu_mem_total=f.get("gpu_mem_total"),
            gpu_power_w=f.get("gpu_power_w"),
            gpu_temp_c=f.get("gpu_temp_c"),
            queue_depth=f.get("queue_depth"),
            queue_buffered=f.get("queue_buffered"),
            last_batch_size=f.get("last_batch_size"),
            mean_batch_size=mean_batch,
            queue_wait_ms=f.get("queue_wait_ms"),
            slots_in_use=f.get("slots_in_use"),
            tasks_total=f.get("tasks_total"),
            tasks_failed_total=f.get("tasks_failed_total"),
            tasks_per_s=tasks_per_s if online else None,
            tokens_per_s=tokens_per_s if online else None,
        )


def _received(event: Mapping[str, Any]) -> float:
    return float(event.get("local_received") or event.get("timestamp") or 0.0)
