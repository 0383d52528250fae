"""What the in-process modes run: an executor fed Celery-shaped messages (its image in a
:class:`~producer.claimcheck.MemoryImageStore` claim check, read and validated by the worker's
:class:`~worker.executor.RequestReader`).

(a)  :class:`GenerateExecutor` with batch 1: transformers ``generate``, one request at a time.
(b)  :class:`GenerateExecutor` with static batches: ``generate`` over full batches only, every
     row running to the batch's longest answer.
(cb) the worker's batch executor (``VLMQ_ENGINE=batch``), (c) and the quantized modes the
     worker's default executor: both built by the worker's own factory,
     :func:`worker.factory.build_executor`, from :class:`~worker.settings.WorkerSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.progress import log
from producer.claimcheck import MemoryImageStore
from producer.protocol import AnalysisRequest, Limits
from worker.executor import (
    ContinuousExecutor,
    Executor,
    Message,
    Ready,
    RequestReader,
    StepReport,
    WholeBatches,
    model_failure,
)
from worker.factory import build_executor
from worker.model.generation import Generation
from worker.settings import WorkerSettings

SERVED_MODEL = "vlmq-bench"
ENGINE_COUNTERS = ("prefill_ms", "decode_ms", "decode_steps", "tokens", "admitted",
                   "images_encoded", "images_reused", "vision_ms", "cross_kv_ms",
                   "text_prefill_ms", "admission_host_ms")  # fmt: skip


@dataclass
class Target:
    """An executor as the bench drives it, with the claim check its reader reads from.

    ``max_wait_s`` is the loop's wait while the executor is idle; ``math.inf`` is static
    batching (full batches only, then what is left once arrivals end). ``engine`` is the
    :class:`~worker.engine.ContinuousEngine` of the worker's default executor, for its
    counters.
    """

    label: str
    executor: Executor
    images: MemoryImageStore
    max_batch: int
    max_wait_s: float = 0.0
    engine: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def message(self, task_id: str, spec: Any, data: bytes, arrival: float) -> Message:
        """The Celery task kwargs of a request of ``spec``, its image put in the claim check."""
        request = AnalysisRequest(
            image_key=self.images.put(data),
            question=spec.question,
            max_new_tokens=spec.answer_tokens,
            temperature=0.0,
            top_p=1.0,
            submitted_at=arrival,
        )
        return task_id, request.to_message()

    def engine_counters(self) -> dict[str, float] | None:
        if self.engine is None:
            return None
        return {k: float(getattr(self.engine.stats, k)) for k in ENGINE_COUNTERS}


def new_task_id() -> str:
    return uuid.uuid4().hex


class GenerateExecutor(WholeBatches):
    """Plain transformers ``generate`` over whatever it was given (modes a and b).

    It takes a new batch only when the last one is done. A batch runs to its longest answer;
    each request is answered with its own forced length (padding steps do not count).
    """

    def __init__(self, model: Any, processor: Any, reader: RequestReader, max_batch: int) -> None:
        super().__init__(reader, max_batch)
        self.model = model
        self.processor = processor
        gc = model.generation_config
        eos = gc.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = gc.pad_token_id
        # A reachable EOS (a model not built by the bench) is held off with min_new_tokens.
        self.min_new = any(e < model.get_output_embeddings().out_features for e in self.eos)

    def warmup(self) -> None:
        """Nothing to do: the bench warms (a) and (b) up with a short request."""

    def step(self) -> StepReport:
        ready = self.take()
        t0 = time.perf_counter()
        try:
            generations = self._generate(ready)
        except Exception as exc:
            _release_cuda_cache()
            outcomes = [model_failure(r.task_id, exc) for r in ready]
        else:
            ms = (time.perf_counter() - t0) * 1000.0
            outcomes = [
                self._reader.success(r, g, ms, len(ready))
                for r, g in zip(ready, generations, strict=True)
            ]
        model_ms = (time.perf_counter() - t0) * 1000.0
        return StepReport(outcomes=outcomes, rows=len(ready), model_ms=model_ms)

    def _generate(self, ready: list[Ready]) -> list[Generation]:
        prompts = []
        for r in ready:
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": r.request.question}]}]  # fmt: skip
            prompts.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        inputs = self.processor(
            images=[[r.image] for r in ready],
            text=prompts,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        ).to(self.model.device)
        length = max(r.request.max_new_tokens for r in ready)
        prompt_length = inputs["input_ids"].shape[1]
        extra = {"min_new_tokens": length} if self.min_new else {}
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=length,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **extra,
            )
        new = out[:, prompt_length:].cpu()
        generated = new.shape[1]
        counts = [min(r.request.max_new_tokens, generated) for r in ready]
        texts = self.processor.tokenizer.batch_decode(
            [row[:n] for row, n in zip(new.tolist(), counts, strict=True)],
            skip_special_tokens=True,
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Generation(text=t.strip(), prompt_tokens=p, answer_tokens=n)
            for t, p, n in zip(texts, prompt_tokens, counts, strict=True)
        ]


def _release_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reader(limits: Limits) -> tuple[MemoryImageStore, RequestReader]:
    images = MemoryImageStore()
    return images, RequestReader(images, limits, SERVED_MODEL)


def generate_target(
    model: Any, processor: Any, max_batch: int, label: str, *, limits: Limits | None = None
) -> Target:
    """Modes (a) (``max_batch`` 1) and (b) (static batches of ``max_batch``)."""
    images, reader = _reader(limits or Limits())
    executor = GenerateExecutor(model, processor, reader, max_batch)
    wait = 0.0 if max_batch == 1 else math.inf
    return Target(label, executor, images, max_batch, max_wait_s=wait)


def worker_target(model: Any, processor: Any, settings: WorkerSettings, label: str) -> Target:
    """The executor the worker builds from ``settings`` over this loaded model: the batch
    executor with ``engine="batch"`` (cb), else the continuous engine (c, nf4, fp8). Not warmed up:
    the modes time that. Raises what the factory raises (too many slots for the memory, a
    model it cannot run)."""
    images, reader = _reader(settings.limits)
    t0 = time.perf_counter()
    executor = build_executor(
        dataclasses.replace(settings, warmup=False), reader, loaded=(model, processor)
    )
    build_s = time.perf_counter() - t0
    if not isinstance(executor, ContinuousExecutor):
        return Target(
            label,
            executor,
            images,
            settings.max_batch_size,
            max_wait_s=settings.max_wait_s,
            info={"engine": "batch"},
        )
    engine = executor.engine
    info = {
        "engine": "continuous",
        "build_s": build_s,
        "graph_capture_s": engine.graph_capture_s,
        "cuda_graphs": engine.graph_capture_s > 0,
        "slots": engine.max_slots,
        "max_seq_len": engine.max_seq_len,
        "memory_limit_gib": settings.gpu_memory_gib or None,
        "cache_bytes": engine.cache.nbytes,
        "vision_attention": engine.images.graphs.attention_timings,
        "eos_token_ids": sorted(engine.eos_token_ids),
        "lm_head_rows": engine.parts.geometry.vocab_size,
    }
    log(
        f"{label}: engine ready in {build_s:.1f} s: {engine.max_slots} slots of "
        f"{engine.max_seq_len} tokens, caches {engine.cache.nbytes / 2**30:.2f} GiB, graph "
        f"capture {engine.graph_capture_s:.1f} s"
    )
    return Target(
        label,
        executor,
        images,
        engine.max_slots,
        max_wait_s=settings.max_wait_s,
        engine=engine,
        info=info,
    )
