"""The worker bootstep that runs monitoring beside the loop."""

import logging
from typing import Any

from celery import bootsteps

from worker.bootstep import BatchingStep
from worker.handoff import LoopHandoff
from worker.monitoring.backlog import BrokerBacklog
from worker.monitoring.flower import stats_fields
from worker.monitoring.metrics import MetricsServer, WorkerMetrics, serve_metrics
from worker.monitoring.monitor import WorkerMonitor
from worker.monitoring.nvml import GpuProbe, gpu_selector
from worker.monitoring.outbox import EventOutbox
from worker.monitoring.sampler import Sampler
from worker.monitoring.settings import MonitorSettings

logger = logging.getLogger(__name__)


class MonitoringStep(bootsteps.StartStopStep):
    """Sends ``worker-gpu``/``worker-batch`` events, serves ``/metrics``, and gives the
    worker's figures to ``inspect stats`` (Flower's worker page, :mod:`worker.monitoring.flower`).

    It registers its batch observer when the worker is built, before the loop starts,
    and starts after the model is loaded, so CUDA's device can be matched to NVML's; it
    stops before the loop, and events of the last batch are then dropped.
    """

    requires = (BatchingStep,)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.settings = MonitorSettings.from_env()
        app = worker.app
        ws = app.vlmq.settings
        metrics = WorkerMetrics(
            {
                "model": ws.model,
                "precision": ws.precision,
                "attention": ws.attn_implementation,
                "device": ws.device,
                "max_batch_size": str(ws.max_batch_size),
            },
            dead_letters=lambda: app.vlmq.quarantine.count,
        )
        self.monitor = WorkerMonitor(metrics, EventOutbox())
        app.vlmq.observers.append(self.monitor.on_batch)
        self._server: MetricsServer | None = None
        self._sampler: Sampler | None = None

    def start(self, worker: Any) -> None:
        try:
            self._start(worker)
        except Exception:  # monitoring must never keep the worker from serving
            logger.exception("Monitoring failed to start; the worker runs without it")
            self.stop(worker)

    def _start(self, worker: Any) -> None:
        app = worker.app
        self.monitor.outbox.attach(
            LoopHandoff(worker.hub), lambda: getattr(worker.consumer, "event_dispatcher", None)
        )
        settings = self.settings
        if settings.metrics_port:
            registry = self.monitor.metrics.registry
            self._server = serve_metrics(registry, settings.metrics_addr, settings.metrics_port)
        device = app.vlmq.settings.device
        queues = list(app.amqp.queues.consume_from)
        self._sampler = Sampler(
            self.monitor,
            lambda: GpuProbe.open(gpu_selector(device)),
            BrokerBacklog(app.conf.broker_url, queues),
            settings.interval_s,
        ).start()

    def stop(self, worker: Any) -> None:
        self.monitor.outbox.detach()
        sampler, self._sampler = self._sampler, None
        server, self._server = self._server, None
        try:
            if sampler is not None:
                sampler.stop()
            if server is not None:
                server.stop()
        except Exception:
            logger.exception("Stopping monitoring failed")

    terminate = stop

    def info(self, worker: Any) -> dict[str, Any]:
        """This worker's figures for ``inspect stats`` (the event loop thread)."""
        ws = worker.app.vlmq.settings
        return stats_fields(ws.served_model, ws.device, self.monitor.row())
