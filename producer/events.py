"""The event schema viewers read: the custom worker events vlmq sends, and their fields.

Celery sets every field of a ``worker-*`` event as an attribute of the worker in
``celery.events.state`` and counts the event as a heartbeat, so the names below never
shadow Celery's own (``active``, ``processed``, ``freq``…). A figure that cannot be read
(no GPU, no NVML, a field the card does not report) is left out of the event.
"""

from dataclasses import dataclass
from typing import Any

GPU_EVENT = "worker-gpu"
"""Sent every ``VLMQ_MONITOR_INTERVAL_MS``: GPU figures, queue depth and running totals."""

BATCH_EVENT = "worker-batch"
"""Sent after every batch (or about every second of engine steps): sizes, waits, times."""

GPU_FIELDS = {
    "gpu_name": "the GPU's model name",
    "gpu_util": "% of the last sample period in which the GPU ran a kernel",
    "gpu_mem_used": "bytes of GPU memory in use, whole device",
    "gpu_mem_total": "bytes of GPU memory, whole device",
    "gpu_power_w": "power draw, watts",
    "gpu_temp_c": "GPU temperature, °C",
    "queue_depth": "messages waiting in the broker for this worker's queues",
    "queue_buffered": "requests prefetched into this worker that are not running yet",
    "model_steps_total": "model steps (batches, or engine decode steps) since the worker started",
    "batch_rows_total": "requests computed in those steps, summed over steps",
    "tasks_total": "tasks that ended in the model since the worker started",
    "tasks_failed_total": "of those, how many ended in a named error",
    "prompt_tokens_total": "prompt tokens since the worker started",
    "answer_tokens_total": "generated tokens since the worker started",
}

BATCH_FIELDS = {
    "batch_size": "mean requests computed together per model step",
    "batch_steps": "model steps this report covers (1 for a batch)",
    "batch_window_s": "wall time this report covers",
    "batch_finished": "requests that ended",
    "batch_failed": "of those, how many ended in a named error",
    "batch_slots_in_use": "requests inside the model after the last step",
    "queue_buffered": "requests still buffered in this worker",
    "queue_wait_ms": "mean time the requests admitted waited in the worker's buffer",
    "batch_model_ms": "time inside model steps",
    "batch_prefill_ms": "of which prefill (when the executor tells it apart)",
    "batch_decode_ms": "of which decode (when the executor tells it apart)",
    "batch_prompt_tokens": "prompt tokens of the requests that ended",
    "batch_answer_tokens": "generated tokens of the requests that ended",
    "batch_tokens_per_s": "generated tokens per second",
}


@dataclass(frozen=True)
class BatchStats:
    """What the model did since the last report (a ``worker-batch`` event's figures).

    A report covers one batch of the batch executor, or about a second of decode steps of
    the continuous engine.
    """

    finished_at: float  # epoch seconds
    window_s: float  # wall time this report covers
    steps: int  # executor steps (batches, or decode steps) in the window
    batch_size: float  # mean requests computed together per step
    slots_in_use: int  # requests inside the model after the last step
    finished: int  # requests that ended in the window
    failed: int  # of those, how many ended in a named error
    pending: int  # requests still buffered in this worker
    queue_wait_ms: float  # mean wait in this worker's buffer of the requests admitted
    model_ms: float  # time inside executor steps
    prefill_ms: float | None  # None: the executor does not tell prefill from decode
    decode_ms: float | None
    prompt_tokens: int
    answer_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.window_s if self.window_s > 0 else 0.0


@dataclass(frozen=True)
class GpuReading:
    """One reading of the worker's GPU; ``None`` where the figure is not available."""

    name: str | None = None
    util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_w: float | None = None
    temp_c: float | None = None


@dataclass(frozen=True)
class Totals:
    """Running totals of what the worker's model did."""

    steps: int = 0
    rows: float = 0.0
    tasks: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0

    def add(self, stats: BatchStats) -> "Totals":
        """These totals plus one report."""
        return Totals(
            steps=self.steps + stats.steps,
            rows=self.rows + stats.batch_size * stats.steps,
            tasks=self.tasks + stats.finished,
            failed=self.failed + stats.failed,
            prompt_tokens=self.prompt_tokens + stats.prompt_tokens,
            answer_tokens=self.answer_tokens + stats.answer_tokens,
        )


@dataclass(frozen=True)
class Sample:
    """What the periodic ``worker-gpu`` event reports."""

    gpu: GpuReading
    queue_depth: int | None
    queue_buffered: int | None
    totals: Totals


def sample_fields(sample: Sample) -> dict[str, Any]:
    """The fields of a ``worker-gpu`` event; figures that are ``None`` are left out."""
    gpu, totals = sample.gpu, sample.totals
    return _present(
        gpu_name=gpu.name,
        gpu_util=gpu.util_pct,
        gpu_mem_used=gpu.mem_used_bytes,
        gpu_mem_total=gpu.mem_total_bytes,
        gpu_power_w=_round(gpu.power_w),
        gpu_temp_c=gpu.temp_c,
        queue_depth=sample.queue_depth,
        queue_buffered=sample.queue_buffered,
        model_steps_total=totals.steps,
        batch_rows_total=_round(totals.rows),
        tasks_total=totals.tasks,
        tasks_failed_total=totals.failed,
        prompt_tokens_total=totals.prompt_tokens,
        answer_tokens_total=totals.answer_tokens,
    )


def batch_fields(stats: BatchStats) -> dict[str, Any]:
    """The fields of a ``worker-batch`` event; prefill and decode times are left out where
    the executor does not tell them apart (the batch executor)."""
    return _present(
        batch_size=_round(stats.batch_size),
        batch_steps=stats.steps,
        batch_window_s=_round(stats.window_s),
        batch_finished=stats.finished,
        batch_failed=stats.failed,
        batch_slots_in_use=stats.slots_in_use,
        queue_buffered=stats.pending,
        queue_wait_ms=_round(stats.queue_wait_ms),
        batch_model_ms=_round(stats.model_ms),
        batch_prefill_ms=_round(stats.prefill_ms),
        batch_decode_ms=_round(stats.decode_ms),
        batch_prompt_tokens=stats.prompt_tokens,
        batch_answer_tokens=stats.answer_tokens,
        batch_tokens_per_s=_round(stats.tokens_per_s),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _present(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}
