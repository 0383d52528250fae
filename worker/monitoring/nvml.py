"""The one NVML wrapper (``pynvml`` from nvidia-ml-py): the worker's monitoring, ``vlmq worker
--gpus all`` and the bench read GPUs through it; reading never raises."""

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from producer.events import GpuReading

logger = logging.getLogger(__name__)


def gpu_selector(device: str, environ: Mapping[str, str] | None = None) -> str | int | None:
    """The NVML UUID or index of the GPU this process computes on; None for a CPU worker.

    NVML ignores ``CUDA_VISIBLE_DEVICES`` and may number cards differently from CUDA, so
    the UUID of CUDA's device 0 is used when torch has initialised CUDA; otherwise the
    first entry of ``CUDA_VISIBLE_DEVICES`` (which ``VLMQ_GPU`` sets).
    """
    if device != "cuda":
        return None
    uuid = _torch_device_uuid()
    if uuid is not None:
        return uuid
    env = os.environ if environ is None else environ
    first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return first
    return int(first) if first.isdigit() else 0


def _torch_device_uuid() -> str | None:
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except Exception:  # an old torch without .uuid, a lost device
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def count_gpus() -> int:
    """How many GPUs NVML sees; raises what NVML raises (no nvidia-ml-py, no driver)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


class GpuProbe:
    """An open NVML handle on one GPU; each figure it cannot read comes back as ``None``."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle
        name = self._get(nvml.nvmlDeviceGetName, handle)
        self._name = name.decode() if isinstance(name, bytes) else name

    @classmethod
    def open(cls, selector: str | int | None) -> "GpuProbe | None":
        """Open the GPU named by :func:`gpu_selector`; None without NVML or a GPU."""
        if selector is None:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            if isinstance(selector, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(selector)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(selector)
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, ...
            logger.warning("No GPU figures: cannot open GPU %s through NVML: %s", selector, exc)
            return None
        return cls(pynvml, handle)

    def read(self) -> GpuReading:
        nvml, h = self._nvml, self._handle
        util = self._get(nvml.nvmlDeviceGetUtilizationRates, h)
        mem = self._get(nvml.nvmlDeviceGetMemoryInfo, h)
        power_mw = self._get(nvml.nvmlDeviceGetPowerUsage, h)
        return GpuReading(
            name=self._name,
            util_pct=None if util is None else float(util.gpu),
            mem_used_bytes=None if mem is None else int(mem.used),
            mem_total_bytes=None if mem is None else int(mem.total),
            power_w=None if power_mw is None else power_mw / 1000.0,
            temp_c=self._get(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
        )

    def close(self) -> None:
        self._get(self._nvml.nvmlShutdown)

    def _get(self, fn: Callable[..., Any], *args: Any) -> Any:
        # A MIG slice or an old card answers NotSupported for some figures: leave them out.
        try:
            return fn(*args)
        except Exception:
            return None
