"""The custom worker events vlmq sends, and their fields.

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
"""Sent after every batch: its size, waits, times and tokens."""

GPU_FIELDS = {
    "gpu_name": "the GPU's model name",
    "gpu_util": "% of the last sample period in which the GPU ran a kernel",
    "gpu_mem_used": "bytes of GPU memory in use, whole device",
    "gpu_mem_total": "bytes of GPU memory, whole device",
    "gpu_power_w": "power draw, watts",
    "gpu_temp_c": "GPU temperature, °C",
    "queue_depth": "messages waiting in the broker for this worker's queues",
    "queue_buffered": "requests prefetched into this worker that are not running yet",
    "batches_total": "batches run since the worker started",
    "tasks_total": "tasks that reached the model since the worker started",
    "tasks_failed_total": "of those, how many ended in a named error",
    "prompt_tokens_total": "prompt tokens since the worker started",
    "answer_tokens_total": "generated tokens since the worker started",
}

BATCH_FIELDS = {
    "batch_size": "requests that reached the model",
    "batch_failed": "of those, how many ended in a named error",
    "queue_buffered": "requests still buffered in this worker after this batch was cut",
    "queue_wait_ms": "mean time the batch's requests waited in the worker's buffer",
    "batch_model_ms": "validation, image loading and generation",
    "batch_prompt_tokens": "prompt tokens of the batch",
    "batch_answer_tokens": "generated tokens of the batch",
    "batch_tokens_per_s": "generated tokens per second of model time",
    "batch_prefill_ms": "prefill time (when the engine reports it)",
    "batch_decode_ms": "decode time (when the engine reports it)",
    "batch_slots_in_use": "engine slots in use (when the engine reports it)",
}


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
    """Running totals of what the worker's batches did."""

    batches: int = 0
    tasks: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0

    def add(self, stats: Any) -> "Totals":
        """These totals plus one :class:`worker.batcher.BatchStats`."""
        return Totals(
            batches=self.batches + 1,
            tasks=self.tasks + stats.batch_size,
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
        batches_total=totals.batches,
        tasks_total=totals.tasks,
        tasks_failed_total=totals.failed,
        prompt_tokens_total=totals.prompt_tokens,
        answer_tokens_total=totals.answer_tokens,
    )


def batch_fields(stats: Any) -> dict[str, Any]:
    """The fields of a ``worker-batch`` event from a :class:`worker.batcher.BatchStats`.

    ``prefill_ms``, ``decode_ms`` and ``slots_in_use`` are sent once the stats carry them.
    """
    return _present(
        batch_size=stats.batch_size,
        batch_failed=stats.failed,
        queue_buffered=stats.pending,
        queue_wait_ms=_round(stats.queue_wait_ms),
        batch_model_ms=_round(stats.model_ms),
        batch_prompt_tokens=stats.prompt_tokens,
        batch_answer_tokens=stats.answer_tokens,
        batch_tokens_per_s=_round(stats.tokens_per_s),
        batch_prefill_ms=_round(getattr(stats, "prefill_ms", None)),
        batch_decode_ms=_round(getattr(stats, "decode_ms", None)),
        batch_slots_in_use=getattr(stats, "slots_in_use", None),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _present(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}
