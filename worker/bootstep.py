"""The worker bootstep that loads the model once and runs the batcher beside Celery's loop."""

import logging
import time
from typing import Any

from celery import bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool

from producer.errors import ConfigurationError
from worker.batcher import Batcher
from worker.executor import (
    BatchExecutor,
    ContinuousExecutor,
    Executor,
    ImageSource,
    RequestReader,
)
from worker.handoff import LoopHandoff
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

# Room in each engine slot for the prompt (chat template and question) besides the answer.
PROMPT_TOKENS = 512


def refuse_prefork(pool_cls: Any) -> None:
    """CUDA does not survive ``fork``: the model must live in the worker's main process."""
    if isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool):
        raise ConfigurationError(
            "the prefork pool cannot serve a GPU model (CUDA does not survive fork); "
            "start the worker with --pool=solo (the default for vlmq) or --pool=threads"
        )


class BatchingStep(bootsteps.StartStopStep):
    """Loads and warms the model before the consumer starts, then runs the batcher.

    The worker blueprint starts this step before ``Consumer`` (which is always last), so
    no message is taken before the model is ready; on shutdown the consumer stops first
    and this step lets the batch in flight finish, stores its results and acks them.
    """

    requires = ("celery.worker.components:Hub", "celery.worker.components:Pool")

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        refuse_prefork(worker.pool_cls)
        worker.vlmq_batcher = None

    def start(self, worker: Any) -> None:
        app = worker.app
        settings: WorkerSettings = app.vlmq_worker_settings
        images: ImageSource = app.vlmq_image_source
        reader = RequestReader(images, settings.limits, settings.served_model)
        executor = load_executor(settings, reader)
        batcher = Batcher(
            executor,
            LoopHandoff(worker.hub),
            app,
            max_wait_s=settings.max_wait_s,
            max_attempts=settings.max_attempts,
            observers=app.vlmq_batch_observers,
        )
        worker.vlmq_batcher = batcher
        batcher.start()

    def stop(self, worker: Any) -> None:
        if worker.vlmq_batcher is not None:
            worker.vlmq_batcher.stop()

    terminate = stop


def load_executor(settings: WorkerSettings, reader: RequestReader) -> Executor:
    """Load the one resident model, build its executor, warm it up; fail fast on bad settings."""
    import torch

    from worker.model.loading import load_model

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "VLMQ_DEVICE=cuda but no CUDA device is visible; check VLMQ_GPU / "
            "CUDA_VISIBLE_DEVICES and the driver, or set VLMQ_DEVICE=cpu (tiny model only)"
        )
    t0 = time.perf_counter()
    model, processor = load_model(
        settings.model,
        precision=settings.precision,
        attn_implementation=settings.attn_implementation,
        device=settings.device,
    )
    logger.info(
        "Loaded %s (%s) in %.1f s", settings.model, settings.precision, time.perf_counter() - t0
    )
    executor: Executor
    if settings.engine == "batch":
        from worker.model.runner import MllamaRunner

        executor = BatchExecutor(MllamaRunner(model, processor), reader, settings.max_batch_size)
    else:
        from worker.engine import ContinuousEngine

        t0 = time.perf_counter()
        engine = ContinuousEngine(
            model,
            processor,
            max_slots=settings.max_batch_size,
            max_seq_len=settings.limits.max_new_tokens + PROMPT_TOKENS,
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
    return executor
