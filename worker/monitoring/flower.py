"""The worker's figures in Flower: the ``info()`` of the monitoring bootstep.

Celery merges every worker bootstep's ``info()`` into the reply to ``inspect stats``, and
Flower's worker page lists the keys it does not know in its "Other" tab, fetched again each
time the page is opened. The keys are prefixed ``vlmq_`` so they never shadow Celery's; a
figure not known yet (no batch run, or no GPU) is left out, as in the events.
"""

from typing import Any

from producer.cluster import WorkerRow

NO_GPU = "no GPU"
_GIB = 1024**3


def stats_fields(served_model: str, device: str, row: WorkerRow | None) -> dict[str, Any]:
    """The ``vlmq_*`` keys of ``inspect stats`` for a worker serving ``served_model``."""
    fields: dict[str, Any] = {"vlmq_model": served_model, "vlmq_device": device}
    if row is None:
        return fields
    fields["vlmq_gpu"] = row.gpu_name or NO_GPU
    figures = {
        "vlmq_gpu_utilization_percent": row.gpu_util,
        "vlmq_gpu_memory_used_gib": _gib(row.gpu_mem_used),
        "vlmq_gpu_memory_total_gib": _gib(row.gpu_mem_total),
        "vlmq_gpu_power_watts": row.gpu_power_w,
        "vlmq_gpu_temperature_celsius": row.gpu_temp_c,
        "vlmq_slots_in_use": row.slots_in_use,
        "vlmq_batch_size_mean": _round(row.mean_batch_size),
        "vlmq_batch_size_last": _round(row.last_batch_size),
        "vlmq_tokens_per_second": _round(row.tokens_per_s),
        "vlmq_tasks_per_second": _round(row.tasks_per_s),
        "vlmq_queue_wait_ms": _round(row.queue_wait_ms),
        "vlmq_queue_depth": row.queue_depth,
        "vlmq_buffered_requests": row.queue_buffered,
        "vlmq_tasks_total": row.tasks_total,
        "vlmq_tasks_failed_total": row.tasks_failed_total,
    }
    fields.update({name: value for name, value in figures.items() if value is not None})
    return fields


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / _GIB, 2)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
