"""The worker's own Prometheus metrics and the HTTP server that exposes them."""

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.events import BatchStats, Sample

logger = logging.getLogger(__name__)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """Histograms and counters fed by batch reports, gauges read from the latest sample.

    Metrics live in their own registry, so several can exist in one process (tests). A
    gauge whose figure is unknown (no GPU) is absent from the scrape, never a false 0.
    """

    def __init__(
        self,
        model_info: Mapping[str, str],
        dead_letters: Callable[[], int] | None = None,
    ) -> None:
        """``dead_letters`` reads how many entries this worker dead-lettered
        (:attr:`worker.quarantine.Quarantine.count`): ``vlmq_dead_letters_total``."""
        self.registry = CollectorRegistry()
        r = self.registry
        Info("vlmq_model", "The model this worker serves", registry=r).info(dict(model_info))
        self.batch_size = Histogram(
            "vlmq_batch_size",
            "Mean requests per model step, one observation per report (a batch, or ~1 s of "
            "engine steps)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vlmq_queue_wait_seconds",
            "Mean time the requests admitted in a report waited in the worker's buffer",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "vlmq_model_steps", "Model steps (batches or decode steps)", registry=r
        )
        self.rows = Counter(
            "vlmq_batch_rows", "Requests computed per model step, summed over steps", registry=r
        )
        self.seconds = Counter(
            "vlmq_model_seconds", "Time inside model steps, by phase", ["phase"], registry=r
        )
        self.tasks = Counter(
            "vlmq_tasks", "Tasks that ended in the model, by outcome", ["outcome"], registry=r
        )
        self.tokens = Counter("vlmq_tokens", "Tokens, prompt and answer", ["kind"], registry=r)
        for phase in ("all", "prefill", "decode"):
            self.seconds.labels(phase)
        for outcome in ("succeeded", "failed"):
            self.tasks.labels(outcome)
        for kind in ("prompt", "answer"):
            self.tokens.labels(kind)
        self._latest: Sample | None = None
        r.register(_SampleCollector(self))
        if dead_letters is not None:
            r.register(_DeadLetterCollector(dead_letters))

    def observe_batch(self, stats: BatchStats) -> None:
        """Count one report."""
        self.batch_size.observe(stats.batch_size)
        self.queue_wait.observe(stats.queue_wait_ms / 1000.0)
        self.steps.inc(stats.steps)
        self.rows.inc(stats.batch_size * stats.steps)
        self.seconds.labels("all").inc(stats.model_ms / 1000.0)
        for phase, ms in (("prefill", stats.prefill_ms), ("decode", stats.decode_ms)):
            if ms is not None:
                self.seconds.labels(phase).inc(ms / 1000.0)
        self.tasks.labels("succeeded").inc(stats.finished - stats.failed)
        self.tasks.labels("failed").inc(stats.failed)
        self.tokens.labels("prompt").inc(stats.prompt_tokens)
        self.tokens.labels("answer").inc(stats.answer_tokens)

    def observe_sample(self, sample: Sample) -> None:
        self._latest = sample

    @property
    def latest(self) -> Sample | None:
        return self._latest


class _SampleCollector(Collector):
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sample = self._metrics.latest
        if sample is None:
            return
        gpu = sample.gpu
        gauges = [
            ("vlmq_gpu_utilization_percent", "GPU busy time, % of the sample period",
             gpu.util_pct),
            ("vlmq_gpu_memory_used_bytes", "GPU memory in use, whole device",
             gpu.mem_used_bytes),
            ("vlmq_gpu_memory_total_bytes", "GPU memory, whole device", gpu.mem_total_bytes),
            ("vlmq_gpu_power_watts", "GPU power draw", gpu.power_w),
            ("vlmq_gpu_temperature_celsius", "GPU temperature", gpu.temp_c),
            ("vlmq_buffered_requests", "Requests prefetched into the worker, not running yet",
             sample.queue_buffered),
        ]  # fmt: skip
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)


class _DeadLetterCollector(Collector):
    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "vlmq_dead_letters",
            "Broker entries this worker could not decode or run, moved to vlmq.dead",
            value=self._count(),
        )


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, addr: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)

    @property
    def port(self) -> int:
        return self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)


def serve_metrics(registry: CollectorRegistry, addr: str, port: int) -> MetricsServer | None:
    """Start the endpoint; a port in use or a bad address is logged, and the work goes on."""
    try:
        server = MetricsServer(registry, addr, port)
    except OSError as exc:
        logger.error("Prometheus metrics are off: cannot listen on %s:%d: %s", addr, port, exc)
        return None
    logger.info("Prometheus metrics on http://%s:%d/metrics", addr, server.port)
    return server
