"""Turn task messages into per-task outcomes, one failure never sinking the rest.

Two executors share one interface (:class:`Executor`), both Celery-free:

- :class:`BatchExecutor` runs each batch as one transformers ``generate`` (the reference);
- :class:`ContinuousExecutor` feeds the continuous-batching engine: requests join free slots
  between decode steps and leave as soon as they finish.
"""

import logging
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from producer.errors import InvalidRequest, ModelError, VlmqError, WrongModel
from producer.images import decode_image
from producer.protocol import AnalysisRequest, Limits
from producer.results import AnalysisResult, Timings, parse_cot
from worker.model.generation import Generation, GenerationRequest, warmup_request

logger = logging.getLogger(__name__)

Message = tuple[str, Mapping[str, Any]]  # (task id, task kwargs)


class ImageSource(Protocol):
    def get(self, key: str) -> bytes: ...


class BatchRunner(Protocol):
    def prepare(self, requests: list[GenerationRequest]) -> Any: ...
    def generate(self, batch: Any) -> list[Generation]: ...
    def warmup(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """One task's end: a result dict to store, or a named error with its traceback."""

    task_id: str
    result: dict[str, Any] | None = None
    error: VlmqError | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class StepReport:
    """What one executor step did: the tasks it finished and where the time went."""

    outcomes: list[Outcome] = field(default_factory=list)
    rows: int = 0  # requests computed together in this step (batch size / slots in use)
    prefill_ms: float | None = None  # None: the executor does not tell prefill from decode
    decode_ms: float | None = None
    model_ms: float = 0.0


class Executor(Protocol):
    """How the loop drives a model; everything runs on the loop's model thread."""

    def room(self) -> int:
        """How many more requests it can take now."""

    def has_work(self) -> bool:
        """Whether a :meth:`step` would compute anything."""

    def admit(self, messages: Sequence[Message]) -> list[Outcome]:
        """Take requests; returns the outcomes of those that failed at once."""

    def step(self) -> StepReport:
        """Compute; returns the requests that finished."""

    def warmup(self) -> None:
        """Run a small request through the model path, before the worker takes tasks."""

    def reset(self) -> None:
        """Drop every request inside: their messages went back to the broker, so no outcome
        of theirs may come (a redelivery may soon be admitted under the same task id)."""


@dataclass(frozen=True)
class Ready:
    """A validated request with its decoded image, waiting for or inside the model."""

    task_id: str
    request: AnalysisRequest
    image: Image.Image
    admitted_at: float  # epoch seconds

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(
            image=self.image,
            question=self.request.question,
            max_new_tokens=self.request.max_new_tokens,
            temperature=self.request.temperature,
            top_p=self.request.top_p,
        )


class RequestReader:
    """Validates a message and loads its image from the claim check."""

    def __init__(self, images: ImageSource, limits: Limits, served_model: str) -> None:
        self._images = images
        self._limits = limits
        self.served_model = served_model

    def read(self, task_id: str, kwargs: Mapping[str, Any]) -> Ready:
        """Raises the named :class:`VlmqError` that says what is wrong with the request."""
        request = AnalysisRequest.from_message(kwargs, self._limits)
        if request.model not in (None, self.served_model):
            raise WrongModel(
                f"this request is for {request.model!r} but the worker that received "
                f"it serves {self.served_model!r}; check the queue routing"
            )
        image = decode_image(self._images.get(request.image_key), self._limits)
        return Ready(task_id, request, image, time.time())

    def read_all(self, messages: Sequence[Message]) -> tuple[list[Ready], list[Outcome]]:
        ready, failed = [], []
        for task_id, kwargs in messages:
            try:
                ready.append(self.read(task_id, kwargs))
            except VlmqError as exc:
                failed.append(failure(task_id, exc))
        return ready, failed

    def success(self, ready: Ready, gen: Generation, gpu_ms: float, batch_size: int) -> Outcome:
        """The stored result of a finished request."""
        queued_ms = max(0.0, (ready.admitted_at - ready.request.submitted_at) * 1000.0)
        result = AnalysisResult(
            task_id=ready.task_id,
            answer=gen.text,
            stages=parse_cot(gen.text),
            prompt_tokens=gen.prompt_tokens,
            answer_tokens=gen.answer_tokens,
            timings=Timings(queued_ms=queued_ms, batch_size=batch_size, gpu_ms=gpu_ms),
            model=self.served_model,
        )
        return Outcome(task_id=ready.task_id, result=result.to_dict())


def failure(task_id: str, exc: VlmqError) -> Outcome:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Outcome(task_id=task_id, error=exc, traceback=tb)


def model_failure(task_id: str, exc: Exception) -> Outcome:
    """A request the model failed on alone, as a named :class:`ModelError`."""
    error = ModelError(f"the model failed on this request: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return failure(task_id, error)


class WholeBatches:
    """The buffer of an executor that computes a whole batch at a time: it takes requests
    only while idle, up to ``max_batch_size``; :meth:`take` hands the batch to its step."""

    def __init__(self, reader: RequestReader, max_batch_size: int) -> None:
        self._reader = reader
        self.max_batch_size = max_batch_size
        self._ready: list[Ready] = []

    def room(self) -> int:
        return 0 if self._ready else self.max_batch_size

    def has_work(self) -> bool:
        return bool(self._ready)

    def admit(self, messages: Sequence[Message]) -> list[Outcome]:
        ready, failed = self._reader.read_all(messages)
        self._ready.extend(ready)
        return failed

    def reset(self) -> None:
        self._ready.clear()

    def take(self) -> list[Ready]:
        """The batch to compute now; the buffer is empty after."""
        ready, self._ready = self._ready, []
        return ready


class BatchExecutor(WholeBatches):
    """Each batch is one transformers ``generate``; a failing batch is split and retried.

    Splitting in halves means a request that breaks the model (or a batch too large for
    memory) fails alone as :class:`ModelError` while every other request gets its answer.
    """

    def __init__(self, runner: BatchRunner, reader: RequestReader, max_batch_size: int) -> None:
        super().__init__(reader, max_batch_size)
        self._runner = runner

    def step(self) -> StepReport:
        ready = self.take()
        t0 = time.perf_counter()
        outcomes = self._generate_isolating_failures(ready)
        model_ms = (time.perf_counter() - t0) * 1000.0
        return StepReport(outcomes=outcomes, rows=len(ready), model_ms=model_ms)

    def warmup(self) -> None:
        self._runner.warmup()

    def _generate_isolating_failures(self, ready: list[Ready]) -> list[Outcome]:
        if not ready:
            return []
        try:
            t0 = time.perf_counter()
            batch = self._runner.prepare([r.generation_request() for r in ready])
            generations = self._runner.generate(batch)
            gpu_ms = (time.perf_counter() - t0) * 1000.0
        except Exception as exc:
            _release_cuda_cache()
            if len(ready) == 1:
                logger.exception("Model failed on task %s alone", ready[0].task_id)
                return [model_failure(ready[0].task_id, exc)]
            logger.warning("Batch of %d failed (%r); retrying in halves", len(ready), exc)
            half = len(ready) // 2
            return self._generate_isolating_failures(
                ready[:half]
            ) + self._generate_isolating_failures(ready[half:])
        return [
            self._reader.success(r, g, gpu_ms, len(ready))
            for r, g in zip(ready, generations, strict=True)
        ]


class ContinuousExecutor:
    """Feeds :class:`worker.engine.ContinuousEngine`: requests join between decode steps.

    The CPU work of a new request — validation, image decoding, the processor's resizing,
    tiling and tokenisation — runs in a small thread pool while the GPU decodes.
    """

    def __init__(self, engine: Any, reader: RequestReader, *, prepare_threads: int = 2) -> None:
        self._engine = engine
        self._reader = reader
        self._pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="vlmq-prepare")
        self._preparing: set[Future[Outcome | None]] = set()
        self._lock = threading.Lock()
        self._inside: dict[str, Ready] = {}

    @property
    def engine(self) -> Any:
        """The engine it feeds (the bench reads its counters)."""
        return self._engine

    def warmup(self) -> None:
        self._engine.submit("vlmq-warmup", warmup_request())
        while self._engine.has_work():
            self._engine.step()

    def reset(self) -> None:
        wait(self._preparing)  # none of them may reach the engine after this
        self._preparing.clear()
        with self._lock:
            task_ids, self._inside = list(self._inside), {}
        self._engine.abort(task_ids)

    def room(self) -> int:
        # Only as many as can start now: the rest stay in the loop's buffer, where a
        # revoke or `expires` still reaches them.
        return max(0, self._engine.free_slots - self._engine.waiting - len(self._preparing))

    def has_work(self) -> bool:
        return bool(self._preparing) or self._engine.has_work()

    def admit(self, messages: Sequence[Message]) -> list[Outcome]:
        for task_id, kwargs in messages:
            self._preparing.add(self._pool.submit(self._prepare, task_id, kwargs))
        return []

    def _prepare(self, task_id: str, kwargs: Mapping[str, Any]) -> Outcome | None:
        """Pool thread: read the request and queue it in the engine; an outcome if it failed."""
        try:
            ready = self._reader.read(task_id, kwargs)
        except VlmqError as exc:
            return failure(task_id, exc)
        with self._lock:
            self._inside[task_id] = ready
        try:
            self._engine.submit(task_id, ready.generation_request())
        except ValueError as exc:
            with self._lock:
                del self._inside[task_id]
            return failure(task_id, InvalidRequest(str(exc)))
        return None

    def step(self) -> StepReport:
        done = {future for future in self._preparing if future.done()}
        if not done and not self._engine.has_work():
            done, _ = wait(self._preparing, return_when=FIRST_COMPLETED)
        self._preparing -= done
        outcomes = [outcome for future in done if (outcome := future.result()) is not None]
        if not self._engine.has_work():
            return StepReport(outcomes=outcomes)
        stats = self._engine.stats
        prefill0, decode0 = stats.prefill_ms, stats.decode_ms
        rows = self._engine.active + self._engine.waiting
        t0 = time.perf_counter()
        finished = self._engine.step()
        model_ms = (time.perf_counter() - t0) * 1000.0
        now = time.time()
        for task_id, answer in finished:
            with self._lock:
                ready = self._inside.pop(task_id)
            if isinstance(answer, Exception):
                outcomes.append(model_failure(task_id, answer))
            else:
                gpu_ms = (now - ready.admitted_at) * 1000.0
                outcomes.append(self._reader.success(ready, answer, gpu_ms, rows))
        return StepReport(
            outcomes=outcomes,
            rows=rows,
            prefill_ms=stats.prefill_ms - prefill0,
            decode_ms=stats.decode_ms - decode0,
            model_ms=model_ms,
        )


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
