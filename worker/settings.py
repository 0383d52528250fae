"""Typed worker settings, read once from the environment at start-up."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from producer.config import env_int
from producer.errors import ConfigurationError
from producer.protocol import Limits, served_model_id

#: Weights in that dtype, or the language model quantized (CUDA only): nf4 by bitsandbytes,
#: fp8 (e4m3, per-channel scales) at load from bf16 weights, for GPUs with fp8 tensor cores.
DTYPE_PRECISIONS = ("bf16", "fp16", "fp32")
QUANTIZED = ("nf4", "fp8")
PRECISIONS = (*DTYPE_PRECISIONS, *QUANTIZED)
#: Precisions vlmq served once, and why they went; asking for one is refused with the reason.
REMOVED_PRECISIONS = {
    "int8": "bitsandbytes int8 decoded 25x slower than bf16 on an H200 (177 against 6.9 ms a step)",
}
ENGINES = ("continuous", "batch")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")


def _value(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, default).strip().lower() or default


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _value(env, name, default)
    if value not in choices:
        raise ConfigurationError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def check_precision(precision: str, name: str) -> str:
    """``precision`` if the worker serves it; else ConfigurationError naming what to use (and,
    for a removed precision, why it went). ``name`` is what set it, e.g. ``VLMQ_PRECISION``."""
    if precision in REMOVED_PRECISIONS:
        raise ConfigurationError(
            f"{name}={precision} was removed: {REMOVED_PRECISIONS[precision]}. Use bf16, or nf4 "
            f"for a smaller memory footprint, or fp8 on Ada/Hopper GPUs "
            f"(one of {', '.join(PRECISIONS)})"
        )
    if precision not in PRECISIONS:
        raise ConfigurationError(f"{name}={precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class WorkerSettings:
    """What the GPU worker serves and how it batches.

    Environment variables (all prefixed ``VLMQ_``): ``MODEL`` (local directory or hub
    id, required), ``PRECISION`` (bf16, fp16, fp32, nf4, fp8), ``ATTN`` (sdpa, eager,
    flash_attention_2), ``DEVICE`` (cuda, cpu), ``ENGINE`` (continuous: iteration-level
    batching over slots with CUDA-graph decode; batch: one transformers ``generate`` per
    batch), ``MAX_BATCH_SIZE`` (requests computed together: the engine's slots),
    ``MAX_WAIT_MS``, ``PADDING_TILES`` (encode: the vision tower encodes every image as
    ``max_tiles`` tiles, as HF and the trained model do; skip: the real tiles only, a one-tile
    image about a sixth of the cost, outputs of images of fewer tiles change, see
    :mod:`worker.engine.vision`), ``GPU_MEMORY_GIB`` (0: the engine's caches take 90 % of the
    free GPU memory; N: the worker's tensors, weights included, stay within N GiB),
    ``WARMUP`` (1/0), ``MAX_ATTEMPTS`` (runs of a task that may end without a result — a
    worker crash — before it fails as ``ModelError``), ``SWEEP_INTERVAL_S`` (how often the
    sweeper looks for accepted tasks whose message was lost, :mod:`worker.sweeper`; 0:
    never), plus the request limits of :class:`producer.protocol.Limits`
    (``MAX_NEW_TOKENS`` is the cap on new tokens).
    """

    model: str
    precision: str = "bf16"
    attn_implementation: str = "sdpa"
    device: str = "cuda"
    engine: str = "continuous"
    padding_tiles: str = "encode"
    gpu_memory_gib: int = 0
    max_batch_size: int = 32
    max_wait_ms: int = 50
    warmup: bool = True
    max_attempts: int = 3
    sweep_interval_s: int = 30
    limits: Limits = field(default_factory=Limits)

    @property
    def served_model(self) -> str:
        """The id producers route by, e.g. ``llama-3.2v-11b-cot.bf16``."""
        return served_model_id(self.model, self.precision)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def prefetch_count(self) -> int:
        """Messages this worker holds unacked, running or buffered (fair share).

        The continuous engine holds its slots and a quarter more: a slot that frees is filled
        from the buffer at once, and the rest of the queue stays with Redis for idle workers.
        The batch engine holds two full batches, so the next one is ready on time.
        """
        if self.engine == "continuous":
            return self.max_batch_size + max(2, self.max_batch_size // 4)
        return 2 * self.max_batch_size

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "WorkerSettings":
        env = os.environ if environ is None else environ
        model = env.get("VLMQ_MODEL", "").strip()
        if not model:
            raise ConfigurationError(
                "VLMQ_MODEL is not set: set it to a local model directory or a hub id, e.g. "
                "VLMQ_MODEL=meta-llama/Llama-3.2-11B-Vision-Instruct "
                "(or build a tiny test model with `vlmq make-tiny-model DIR`)"
            )
        precision = check_precision(_value(env, "VLMQ_PRECISION", "bf16"), "VLMQ_PRECISION")
        device = _choice(env, "VLMQ_DEVICE", "cuda", DEVICES)
        if precision in QUANTIZED and device != "cuda":
            needs = "bitsandbytes on a GPU" if precision == "nf4" else "a GPU with fp8 tensor cores"
            raise ConfigurationError(
                f"VLMQ_PRECISION={precision} needs {needs}; "
                "use VLMQ_DEVICE=cuda or VLMQ_PRECISION=bf16/fp32"
            )
        warmup = env.get("VLMQ_WARMUP", "1").strip().lower()
        if warmup not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigurationError(f"VLMQ_WARMUP={warmup!r}: use 1 or 0")
        return cls(
            model=model,
            precision=precision,
            attn_implementation=_choice(env, "VLMQ_ATTN", "sdpa", ATTENTION),
            device=device,
            engine=_choice(env, "VLMQ_ENGINE", "continuous", ENGINES),
            padding_tiles=_choice(env, "VLMQ_PADDING_TILES", "encode", ("encode", "skip")),
            gpu_memory_gib=env_int(env, "VLMQ_GPU_MEMORY_GIB", 0, low=0, high=4096),
            max_batch_size=env_int(env, "VLMQ_MAX_BATCH_SIZE", 32, low=1, high=1024),
            max_wait_ms=env_int(env, "VLMQ_MAX_WAIT_MS", 50, low=0, high=60_000),
            warmup=warmup in ("1", "true", "yes"),
            max_attempts=env_int(env, "VLMQ_MAX_ATTEMPTS", 3, low=1, high=100),
            sweep_interval_s=env_int(env, "VLMQ_SWEEP_INTERVAL_S", 30, low=0, high=86_400),
            limits=Limits.from_env(env),
        )
