"""Monitoring settings of the worker, read once from the environment."""

import os
from collections.abc import Mapping
from dataclasses import dataclass

from producer.config import env_int


@dataclass(frozen=True)
class MonitorSettings:
    """``VLMQ_METRICS_PORT`` (0 turns the endpoint off), ``VLMQ_METRICS_ADDR`` and
    ``VLMQ_MONITOR_INTERVAL_MS`` (period of the ``worker-gpu`` event and GPU gauges).

    The port defaults to 9808 plus the GPU index of ``VLMQ_GPU``, so the workers of one
    host (``vlmq worker --gpus``) do not compete for one port.
    """

    metrics_port: int = 9808
    metrics_addr: str = "127.0.0.1"
    interval_ms: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "MonitorSettings":
        """Raises :class:`producer.errors.ConfigurationError` on a malformed value."""
        env = os.environ if environ is None else environ
        defaults = cls()
        gpu = env.get("VLMQ_GPU", "").strip()
        port = defaults.metrics_port + (int(gpu) if gpu.isdigit() else 0)
        return cls(
            metrics_port=env_int(env, "VLMQ_METRICS_PORT", port, low=0, high=65535),
            metrics_addr=env.get("VLMQ_METRICS_ADDR", "").strip() or defaults.metrics_addr,
            interval_ms=env_int(
                env, "VLMQ_MONITOR_INTERVAL_MS", defaults.interval_ms, low=50, high=3_600_000
            ),
        )

    @property
    def interval_s(self) -> float:
        return self.interval_ms / 1000.0
