"""The hub of a worker's monitoring: batches and samples in, metrics and events out."""

import threading

from producer.events import (
    BATCH_EVENT,
    GPU_EVENT,
    BatchStats,
    GpuReading,
    Sample,
    Totals,
    batch_fields,
    sample_fields,
)
from worker.monitoring.metrics import WorkerMetrics
from worker.monitoring.outbox import EventOutbox


class WorkerMonitor:
    """Turns batch stats and periodic readings into metrics and ``worker-*`` events.

    :meth:`on_batch` is a batch observer: it runs on the model thread, so it only counts
    and enqueues — the events are sent later, on the event loop, by ``outbox``.
    """

    def __init__(self, metrics: WorkerMetrics, outbox: EventOutbox) -> None:
        self.metrics = metrics
        self.outbox = outbox
        self._lock = threading.Lock()
        self._totals = Totals()

    @property
    def totals(self) -> Totals:
        return self._totals

    def on_batch(self, stats: BatchStats) -> None:
        """Observe one report (model thread)."""
        with self._lock:
            self._totals = self._totals.add(stats)
        self.metrics.observe_batch(stats)
        self.outbox.put(BATCH_EVENT, batch_fields(stats))

    def on_sample(
        self, gpu: GpuReading, queue_depth: int | None, queue_buffered: int | None
    ) -> Sample:
        """Publish one periodic reading (sampler thread)."""
        sample = Sample(gpu, queue_depth, queue_buffered, self._totals)
        self.metrics.observe_sample(sample)
        self.outbox.put(GPU_EVENT, sample_fields(sample))
        return sample
