"""The thread that reads the GPU and the queues at a fixed interval."""

import logging
import threading
from collections.abc import Callable

from producer.events import GpuReading
from worker.monitoring.backlog import BrokerBacklog, buffered_requests
from worker.monitoring.monitor import WorkerMonitor
from worker.monitoring.nvml import GpuProbe

logger = logging.getLogger(__name__)


class Sampler:
    """Every ``interval_s``: read the GPU and the backlog, hand them to the monitor.

    NVML is opened in the thread, so a slow driver never delays the worker's start.
    """

    def __init__(
        self,
        monitor: WorkerMonitor,
        open_gpu: Callable[[], GpuProbe | None],
        backlog: BrokerBacklog,
        interval_s: float,
    ) -> None:
        self._monitor = monitor
        self._open_gpu = open_gpu
        self._backlog = backlog
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlmq-monitor", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        gpu = self._open_gpu()
        failing = False
        try:
            while True:
                try:
                    reading = gpu.read() if gpu is not None else GpuReading()
                    self._monitor.on_sample(reading, self._backlog.depth(), buffered_requests())
                    failing = False
                except Exception:  # monitoring must never stop: log once, sample again
                    if not failing:
                        logger.exception("Monitoring sample failed")
                    failing = True
                if self._stop.wait(self._interval_s):
                    return
        finally:
            self._backlog.close()
            if gpu is not None:
                gpu.close()
