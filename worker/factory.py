"""The one factory of the worker's executor: load the model, build the executor, warm it up.

The worker's bootstep, the bench and the demo all build their executor here, so what they
run is what the worker runs.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from producer.errors import ConfigurationError
from worker.collector import freeze_resident
from worker.executor import BatchExecutor, ContinuousExecutor, Executor, RequestReader
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

# Room in each engine slot for the prompt (chat template and question) besides the answer.
PROMPT_TOKENS = 512


def load(settings: WorkerSettings) -> tuple[Any, Any]:
    """The model and processor of ``settings``, on its device; fail fast on bad settings."""
    import torch

    from worker.model.loading import load_model

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "VLMQ_DEVICE=cuda but no CUDA device is visible; check VLMQ_GPU / "
            "CUDA_VISIBLE_DEVICES and the driver, or set VLMQ_DEVICE=cpu (tiny model only)"
        )
    t0 = time.perf_counter()
    loaded = load_model(
        settings.model,
        precision=settings.precision,
        attn_implementation=settings.attn_implementation,
        device=settings.device,
    )
    logger.info(
        "Loaded %s (%s) in %.1f s", settings.model, settings.precision, time.perf_counter() - t0
    )
    return loaded


def build_executor(
    settings: WorkerSettings,
    reader: RequestReader,
    *,
    loaded: tuple[Any, Any] | None = None,
    visibility_timeout_s: float | None = None,
) -> Executor:
    """Load the one resident model, build its executor, warm it up, freeze what is resident
    out of the garbage collector's sight (:mod:`worker.collector`); fail fast on bad settings.

    ``loaded`` is a ``(model, processor)`` already loaded with these settings (the bench loads
    the weights once for several executors); else :func:`load`.

    With ``visibility_timeout_s`` (the broker's), also time a full batch after the warm-up and
    refuse a timeout shorter than a message can stay unacked (:func:`check_visibility_timeout`).
    """
    model, processor = loaded if loaded is not None else load(settings)
    executor: Executor
    if settings.engine == "batch":
        from worker.model.runner import MllamaRunner

        runner = MllamaRunner(model, processor)
        executor = BatchExecutor(runner, reader, settings.max_batch_size)
    else:
        from worker.engine import ContinuousEngine

        t0 = time.perf_counter()
        engine = ContinuousEngine(
            model,
            processor,
            max_slots=settings.max_batch_size,
            max_seq_len=settings.limits.max_new_tokens + PROMPT_TOKENS,
            memory_limit=settings.gpu_memory_gib * 2**30 or None,
            skip_padding_tiles=settings.padding_tiles == "skip",
        )
        logger.info(
            "Engine ready in %.1f s: %d slots of %d tokens",
            time.perf_counter() - t0, engine.max_slots, engine.max_seq_len,
        )  # fmt: skip
        executor = ContinuousExecutor(engine, reader)
    if settings.warmup:
        t0 = time.perf_counter()
        executor.warmup()
        logger.info("Warmed up in %.1f s", time.perf_counter() - t0)
    freeze_resident()
    if visibility_timeout_s is None:
        return executor
    if not settings.warmup:
        logger.warning("VLMQ_WARMUP=0: the visibility timeout is not checked against batch time")
        return executor
    if settings.engine == "batch":
        timing = time_full_batch(
            lambda batch: runner.generate(runner.prepare(batch)), settings.max_batch_size
        )
    else:
        timing = time_full_batch(lambda batch: _run_on_engine(engine, batch), engine.max_slots)
    check_visibility_timeout(settings, timing, visibility_timeout_s)
    return executor


#: New tokens per request when a full batch is timed at start-up.
TIMING_TOKENS = 16
#: The measured worst case is doubled: timing noise, and a failing batch retried in parts.
SAFETY = 2.0


#: Timed runs of each kind; the fastest counts: load from elsewhere only ever adds time.
TIMING_RUNS = 3


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    """A full batch timed at start-up: the fastest of :data:`TIMING_RUNS` runs of each kind."""

    rows: int
    prefill_s: float  # the batch with one new token each
    step_s: float  # each further token
    #: Every timed run, for the log: (prefill seconds, whole long run seconds).
    runs_s: tuple[tuple[float, float], ...] = ()

    def describe(self) -> str:
        """What was measured, for people."""
        runs = ", ".join(f"{p * 1000:.0f}/{t * 1000:.0f}" for p, t in self.runs_s)
        return (
            f"fastest of {len(self.runs_s)} runs: {self.prefill_s:.2f} s prefill, "
            f"{self.step_s * 1000:.1f} ms per token (prefill/long run ms: {runs})"
        )

    def longest_batch_s(self, max_new_tokens: int) -> float:
        return self.prefill_s + self.step_s * max_new_tokens


def time_full_batch(generate: Callable[[list[Any]], list[Any]], rows: int) -> BatchTiming:
    """Time ``generate`` (``GenerationRequest`` list in, ``Generation`` list out) on a full
    batch of ``rows`` synthetic requests, with 1 and with :data:`TIMING_TOKENS` new tokens."""
    from PIL import Image

    from worker.model.generation import warmup_request

    base = warmup_request()

    def run(new_tokens: int) -> tuple[float, int]:
        batch = [
            dataclasses.replace(
                base, image=Image.new("RGB", base.image.size, (i % 256, 64, 32)),
                max_new_tokens=new_tokens, temperature=2.0,  # hot: no early end of text
            )
            for i in range(rows)
        ]  # fmt: skip
        t0 = time.perf_counter()
        try:
            generations = generate(batch)
        except Exception as exc:
            raise ConfigurationError(
                f"a full batch of {rows} small requests failed at start-up ({exc!r}); lower "
                "VLMQ_MAX_BATCH_SIZE or free memory on the device"
            ) from exc
        return time.perf_counter() - t0, max(g.answer_tokens for g in generations)

    run(1)  # the first full batch also pays one-time costs
    runs = []
    for _ in range(TIMING_RUNS):
        prefill_s, _ = run(1)
        total_s, tokens = run(TIMING_TOKENS)
        runs.append((prefill_s, total_s, tokens))
    prefill_s = min(p for p, _, _ in runs)
    total_s, tokens = min((t, n) for _, t, n in runs)
    # Should every row still end at once, the whole run counts as one step: an overestimate.
    step_s = max(total_s - prefill_s, 0.0) / (tokens - 1) if tokens > 1 else total_s
    return BatchTiming(
        rows=rows, prefill_s=prefill_s, step_s=step_s, runs_s=tuple((p, t) for p, t, _ in runs)
    )


def _run_on_engine(engine: Any, batch: list[Any]) -> list[Any]:
    for i, request in enumerate(batch):
        engine.submit(f"vlmq-timing-{i}", request)
    answers = []
    while engine.has_work():
        answers += [answer for _, answer in engine.step()]
    failed = [a for a in answers if isinstance(a, Exception)]
    if failed:
        raise failed[0]
    return answers


def check_visibility_timeout(
    settings: WorkerSettings, timing: BatchTiming, visibility_timeout_s: float
) -> None:
    """Refuse a visibility timeout shorter than a message can stay unacked in this worker.

    A message waits up to the batch wait, then for the batch ahead of it, then for its own
    batch: ``max_wait + 2 x longest batch``, the longest batch being a full one generating
    ``VLMQ_MAX_NEW_TOKENS`` tokens at the times measured at start-up, times :data:`SAFETY`.
    Past the timeout Redis hands the message to another worker while it still runs here.
    """
    cap = settings.limits.max_new_tokens
    longest_batch_s = SAFETY * timing.longest_batch_s(cap)
    needed_s = settings.max_wait_s + 2 * longest_batch_s
    if visibility_timeout_s < needed_s:
        raise ConfigurationError(
            f"VLMQ_VISIBILITY_TIMEOUT_S={visibility_timeout_s:g} is too short: a message can "
            f"stay unacked here for about {needed_s:.0f} s (a full batch of {timing.rows} "
            f"generating VLMQ_MAX_NEW_TOKENS={cap} tokens takes up to {longest_batch_s:.0f} s "
            f"with a {SAFETY:g}x margin, timed at start-up ({timing.describe()}), and a "
            "message may wait for the batch ahead of it); Redis would then run it a second "
            "time on "
            f"another worker. Set VLMQ_VISIBILITY_TIMEOUT_S={math.ceil(needed_s)} or more on "
            "workers and producers alike, or lower VLMQ_MAX_NEW_TOKENS or VLMQ_MAX_BATCH_SIZE"
        )
    logger.info(
        "Visibility timeout %g s covers the longest a message stays unacked, about %.0f s "
        "(full batch of %d, %s)",
        visibility_timeout_s, needed_s, timing.rows, timing.describe(),
    )  # fmt: skip
