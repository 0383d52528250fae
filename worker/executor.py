"""Turn a batch of task messages into per-task outcomes, one failure never sinking the rest."""

import dataclasses
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from producer.errors import ModelError, VlmqError, WrongModel
from producer.images import decode_image
from producer.protocol import AnalysisRequest, Limits
from producer.results import parse_cot
from worker.model.runner import Generation, GenerationRequest

logger = logging.getLogger(__name__)


class ImageSource(Protocol):
    def get(self, key: str) -> bytes: ...


class BatchRunner(Protocol):
    def prepare(self, requests: list[GenerationRequest]) -> Any: ...
    def generate(self, batch: Any) -> list[Generation]: ...


@dataclass(frozen=True)
class Outcome:
    """One task's end: a result dict to store, or a named error with its traceback."""

    task_id: str
    result: dict[str, Any] | None = None
    error: VlmqError | None = None
    traceback: str | None = None


@dataclass(frozen=True)
class _Ready:
    task_id: str
    request: AnalysisRequest
    image: Image.Image


def _failure(task_id: str, exc: VlmqError) -> Outcome:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Outcome(task_id=task_id, error=exc, traceback=tb)


class BatchExecutor:
    """Validates, loads and generates for a batch; knows nothing of Celery.

    A batch whose generation raises is split in halves and retried, so a request
    that breaks the model (or a batch too large for memory) fails alone as
    :class:`ModelError` while every other request still gets its answer.
    """

    def __init__(
        self, runner: BatchRunner, images: ImageSource, limits: Limits, served_model: str
    ) -> None:
        self._runner = runner
        self._images = images
        self._limits = limits
        self._served_model = served_model

    def run(self, messages: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Outcome]:
        """Run ``(task_id, task kwargs)`` pairs; one outcome per pair, in order."""
        started = time.time()
        outcomes: dict[str, Outcome] = {}
        ready: list[_Ready] = []
        for task_id, kwargs in messages:
            try:
                request = AnalysisRequest.from_message(kwargs, self._limits)
                if request.model not in (None, self._served_model):
                    raise WrongModel(
                        f"this request is for {request.model!r} but the worker that received "
                        f"it serves {self._served_model!r}; check the queue routing"
                    )
                image = decode_image(self._images.get(request.image_key), self._limits)
            except VlmqError as exc:
                outcomes[task_id] = _failure(task_id, exc)
            else:
                ready.append(_Ready(task_id, request, image))
        for outcome in self._generate_isolating_failures(ready, started):
            outcomes[outcome.task_id] = outcome
        return [outcomes[task_id] for task_id, _ in messages]

    def _generate_isolating_failures(self, ready: list[_Ready], started: float) -> list[Outcome]:
        if not ready:
            return []
        try:
            t0 = time.perf_counter()
            generations = self._runner.generate(
                self._runner.prepare([_generation_request(r.request, r.image) for r in ready])
            )
            gpu_ms = (time.perf_counter() - t0) * 1000.0
        except Exception as exc:
            _release_cuda_cache()
            if len(ready) == 1:
                logger.exception("Model failed on task %s alone", ready[0].task_id)
                error = ModelError(f"the model failed on this request: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                return [_failure(ready[0].task_id, error)]
            logger.warning("Batch of %d failed (%r); retrying in halves", len(ready), exc)
            half = len(ready) // 2
            return self._generate_isolating_failures(
                ready[:half], started
            ) + self._generate_isolating_failures(ready[half:], started)
        return [
            Outcome(task_id=r.task_id, result=self._result(r, g, started, gpu_ms, len(ready)))
            for r, g in zip(ready, generations, strict=True)
        ]

    def _result(
        self, ready: _Ready, gen: Generation, started: float, gpu_ms: float, batch_size: int
    ) -> dict[str, Any]:
        stages = parse_cot(gen.text)
        return {
            "answer": gen.text,
            "stages": dataclasses.asdict(stages) if stages is not None else None,
            "prompt_tokens": gen.prompt_tokens,
            "answer_tokens": gen.answer_tokens,
            "timings": {
                "queued_ms": max(0.0, (started - ready.request.submitted_at) * 1000.0),
                "batch_size": batch_size,
                "gpu_ms": gpu_ms,
            },
            "model": self._served_model,
        }


def _generation_request(request: AnalysisRequest, image: Image.Image) -> GenerationRequest:
    return GenerationRequest(
        image=image,
        question=request.question,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
    )


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
