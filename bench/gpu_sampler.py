"""GPU utilisation and memory sampled every 100 ms in a background thread.

NVML (``pynvml`` from nvidia-ml-py) when it imports; else ``nvidia-smi`` streaming its own
samples; else nothing (a CPU run), which the report says. The samples are device-wide, so
they include the Celery worker process of mode (d).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field


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
    _proc: subprocess.Popen | None = None

    def start(self) -> GpuSampler:
        """Start sampling with the best source available; never raises."""
        try:
            self._start_nvml()
            return self
        except Exception as exc:  # ImportError, NVMLError, ...
            self.error = f"NVML: {type(exc).__name__}: {exc}"
        try:
            self._start_smi()
        except Exception as exc:
            self.error = f"{self.error}; nvidia-smi: {type(exc).__name__}: {exc}"
        return self

    def _start_nvml(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        handle = None
        for uuid in filter(None, [self.uuid, self.uuid and f"GPU-{self.uuid}"]):
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                break
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used
                    self.samples.append(Sample(time.time(), float(util), float(mem)))
                except Exception as exc:
                    self.error = f"NVML sample: {exc}"
                self._stop.wait(self.period_s)
            pynvml.nvmlShutdown()

        self.source = "nvml"
        self._thread = threading.Thread(target=loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _start_smi(self) -> None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise FileNotFoundError("no nvidia-smi on PATH")
        self._proc = subprocess.Popen(
            [
                smi,
                f"--id={self.index}",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                f"--loop-ms={int(self.period_s * 1000)}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

        def loop() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                try:
                    util, mem = (float(x) for x in line.split(","))
                except ValueError:
                    continue
                self.samples.append(Sample(time.time(), util, mem * 1024 * 1024))

        self.source = "nvidia-smi"
        self._thread = threading.Thread(target=loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (idempotent)."""
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
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
