"""Pin the worker process to one GPU before torch initialises CUDA."""

import os
import sys

from producer.errors import ConfigurationError

GPU_ENV = "VLMQ_GPU"


def pin_gpu(environ: dict[str, str] | None = None) -> str | None:
    """Restrict this process to the GPU named by ``VLMQ_GPU`` (an index or UUID).

    Sets ``CUDA_VISIBLE_DEVICES`` so the model lands on that card as ``cuda:0``.
    Must run before torch touches CUDA: once CUDA is initialised the set of visible
    devices is fixed, so pinning afterwards would silently use the wrong card.
    """
    env = os.environ if environ is None else environ
    gpu = env.get(GPU_ENV, "").strip()
    if not gpu:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ConfigurationError(
            f"{GPU_ENV}={gpu} was set after CUDA was initialised in this process; "
            "set it in the environment before the worker starts"
        )
    env["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
