"""The hub of a worker's monitoring: batches and samples in, metrics and events out."""

import threading
import time

from producer.cluster import ClusterState, WorkerRow
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

#: The name this worker's own events are folded under in :meth:`WorkerMonitor.row`.
_SELF = "self"


class WorkerMonitor:
    """Turns batch stats and periodic readings into metrics and ``worker-*`` events.

    :meth:`on_batch` is a batch observer: it runs on the model thread, so it only counts
    and enqueues — the events are sent later, on the event loop, by ``outbox``. The same
    events are folded into a :class:`ClusterState`, so :meth:`row` gives this worker's
    figures exactly as ``vlmq top`` computes them from the events.
    """

    def __init__(self, metrics: WorkerMetrics, outbox: EventOutbox) -> None:
        self.metrics = metrics
        self.outbox = outbox
        self._lock = threading.Lock()
        self._totals = Totals()
        self._state = ClusterState()

    @property
    def totals(self) -> Totals:
        return self._totals

    def on_batch(self, stats: BatchStats) -> None:
        """Observe one report (model thread)."""
        with self._lock:
            self._totals = self._totals.add(stats)
        self.metrics.observe_batch(stats)
        self._publish(BATCH_EVENT, batch_fields(stats))

    def on_sample(
        self, gpu: GpuReading, queue_depth: int | None, queue_buffered: int | None
    ) -> Sample:
        """Publish one periodic reading (sampler thread)."""
        sample = Sample(gpu, queue_depth, queue_buffered, self._totals)
        self.metrics.observe_sample(sample)
        self._publish(GPU_EVENT, sample_fields(sample))
        return sample

    def row(self) -> WorkerRow | None:
        """This worker's latest figures; None before its first sample or batch."""
        with self._lock:
            rows = self._state.rows(time.time())
        return rows[0] if rows else None

    def _publish(self, event_type: str, fields: dict) -> None:
        with self._lock:
            self._state.apply(
                {"type": event_type, "hostname": _SELF, "timestamp": time.time(), **fields}
            )
        self.outbox.put(event_type, fields)
