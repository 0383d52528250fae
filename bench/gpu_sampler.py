"""GPU utilisation and memory sampled every 100 ms in a background thread.

Through the worker's own NVML wrapper (:class:`worker.monitoring.nvml.GpuProbe`); without
NVML or a GPU (a CPU run) there are no samples, which the report says. The samples are
device-wide, so they include the Celery worker process of mode (d).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from worker.monitoring.nvml import GpuProbe


@dataclass
class Sample:
    t: float  # epoch seconds
    util: float  # % of the last sample period the GPU was busy
    mem_used: float  # bytes, whole device


@dataclass
class GpuSampler:
    """Samples the GPU of ``uuid`` (else ``index``, NVML numbering) every ``period_s``."""

    index: int = 0
    uuid: str | None = None
    period_s: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    source: str = "none"
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        """Start sampling if NVML opens the GPU; never raises."""
        selector: str | int = self.index
        if self.uuid:
            selector = self.uuid if self.uuid.startswith(("GPU-", "MIG-")) else f"GPU-{self.uuid}"
        probe = GpuProbe.open(selector)
        if probe is None:
            self.error = f"NVML cannot open GPU {selector} (see the log)"
            return self

        def loop() -> None:
            while not self._stop.is_set():
                reading = probe.read()
                if reading.util_pct is not None and reading.mem_used_bytes is not None:
                    self.samples.append(
                        Sample(time.time(), reading.util_pct, float(reading.mem_used_bytes))
                    )
                self._stop.wait(self.period_s)
            probe.close()

        self.source = "nvml"
        self._thread = threading.Thread(target=loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        """Mean and max utilisation and peak memory between epoch times ``t0`` and ``t1``."""
        inside = [s for s in list(self.samples) if t0 <= s.t <= t1]
        if not inside:
            return {"util_mean": None, "util_max": None, "mem_peak": None, "n": 0}
        utils = [s.util for s in inside]
        return {
            "util_mean": sum(utils) / len(utils),
            "util_max": max(utils),
            "mem_peak": max(s.mem_used for s in inside),
            "n": len(inside),
        }

    def to_dict(self) -> dict:
        """Source and every sample as columns (compact JSON)."""
        samples = list(self.samples)
        return {
            "source": self.source,
            "error": self.error,
            "period_s": self.period_s,
            "t": [round(s.t, 3) for s in samples],
            "util": [s.util for s in samples],
            "mem_used": [s.mem_used for s in samples],
        }
