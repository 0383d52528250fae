"""The in-process modes and the loop that drives them.

Every in-process mode is a :class:`worker.executor.Executor` fed Celery-shaped messages (the
image in a :class:`~producer.claimcheck.MemoryImageStore` claim check, read and validated by the
worker's :class:`~worker.executor.RequestReader`):

(a)  :class:`GenerateExecutor` with batch 1: transformers ``generate``, one request at a time.
(b)  :class:`GenerateExecutor` with static batches: ``generate`` over full batches only, every
     row running to the batch's longest answer.
(cb) the worker's previous engine: :class:`~worker.executor.BatchExecutor` over
     :class:`~worker.model.runner.MllamaRunner`, one ``generate`` per batch.
(c)  the worker's default engine: :class:`~worker.executor.ContinuousExecutor` over
     :class:`~worker.engine.ContinuousEngine`, built as ``worker.bootstep.load_executor`` does.

:func:`drive` runs the worker batcher's loop (``Batcher._take/_admit/_step``) on the calling
thread: take buffered requests when the executor has room (at once while it is busy, after the
batch wait while it is idle), admit them, step while it has work. Arrivals come from a feeder
thread (Poisson) or from completions (closed loop), so with (c) new requests join free slots
while others decode.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.progress import Progress, log
from bench.workload import RequestSpec
from producer.claimcheck import MemoryImageStore
from producer.protocol import AnalysisRequest, Limits
from worker.executor import (
    BatchExecutor,
    ContinuousExecutor,
    Executor,
    Message,
    Outcome,
    Ready,
    RequestReader,
    StepReport,
    model_failure,
)
from worker.model.generation import Generation
from worker.policy import decide_batch
from worker.settings import WorkerSettings

SERVED_MODEL = "vlmq-bench"
ENGINE_COUNTERS = ("prefill_ms", "decode_ms", "decode_steps", "tokens", "admitted",
                   "images_encoded", "images_reused", "vision_ms", "cross_kv_ms",
                   "text_prefill_ms", "admission_host_ms")  # fmt: skip


@dataclass
class Job:
    """One request in flight: its spec, its image bytes, when it arrived and entered the
    executor (epoch seconds)."""

    spec: RequestSpec
    data: bytes
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = 0.0
    start: float | None = None


@dataclass
class Target:
    """An executor as the bench drives it, with the claim check its reader reads from.

    ``max_wait_s`` is the batcher's wait while the executor is idle; ``math.inf`` is static
    batching (full batches only, then what is left once arrivals end). ``engine`` is the
    :class:`~worker.engine.ContinuousEngine` under (c), for its counters.
    """

    label: str
    executor: Executor
    images: MemoryImageStore
    max_batch: int
    max_wait_s: float = 0.0
    engine: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def message(self, job: Job) -> Message:
        """The Celery task kwargs of ``job``, its image put in the claim check."""
        request = AnalysisRequest(
            image_key=self.images.put(job.data),
            question=job.spec.question,
            max_new_tokens=job.spec.answer_tokens,
            temperature=0.0,
            top_p=1.0,
            submitted_at=job.arrival,
        )
        return job.task_id, request.to_message()

    def engine_counters(self) -> dict[str, float] | None:
        if self.engine is None:
            return None
        return {k: float(getattr(self.engine.stats, k)) for k in ENGINE_COUNTERS}


class GenerateExecutor:
    """Plain transformers ``generate`` over whatever it was given (modes a and b).

    It takes a new batch only when the last one is done. A batch runs to its longest answer;
    each request is answered with its own forced length (padding steps do not count).
    """

    def __init__(self, model: Any, processor: Any, reader: RequestReader, max_batch: int) -> None:
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self._reader = reader
        self._ready: list[Ready] = []
        gc = model.generation_config
        eos = gc.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = gc.pad_token_id
        # A reachable EOS (a model not built by the bench) is held off with min_new_tokens.
        self.min_new = any(e < model.get_output_embeddings().out_features for e in self.eos)

    def room(self) -> int:
        return 0 if self._ready else self.max_batch

    def has_work(self) -> bool:
        return bool(self._ready)

    def admit(self, messages: Sequence[Message]) -> list[Outcome]:
        ready, failed = self._reader.read_all(messages)
        self._ready.extend(ready)
        return failed

    def reset(self) -> None:
        self._ready.clear()

    def warmup(self) -> None:
        """Nothing to do: the bench warms (a) and (b) up with a short request."""

    def step(self) -> StepReport:
        ready, self._ready = self._ready, []
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


def batch_target(model: Any, processor: Any, settings: WorkerSettings, label: str) -> Target:
    """Mode (cb): the worker's batch executor (``VLMQ_ENGINE=batch``) over this model."""
    from worker.model.runner import MllamaRunner

    images, reader = _reader(settings.limits)
    executor = BatchExecutor(MllamaRunner(model, processor), reader, settings.max_batch_size)
    return Target(
        label,
        executor,
        images,
        settings.max_batch_size,
        max_wait_s=settings.max_wait_s,
        info={"engine": "batch"},
    )


def continuous_target(model: Any, processor: Any, settings: WorkerSettings, label: str) -> Target:
    """Mode (c): the worker's default executor, built as ``worker.bootstep.load_executor``
    builds it from ``settings`` (``max_slots`` = ``VLMQ_MAX_BATCH_SIZE``, ``max_seq_len`` =
    the request limit's ``max_new_tokens`` + the prompt room). Raises what the engine raises
    (too many slots for the memory, a model it cannot run)."""
    from worker.engine import ContinuousEngine
    from worker.factory import PROMPT_TOKENS

    images, reader = _reader(settings.limits)
    t0 = time.perf_counter()
    engine = ContinuousEngine(
        model,
        processor,
        max_slots=settings.max_batch_size,
        max_seq_len=settings.limits.max_new_tokens + PROMPT_TOKENS,
        skip_padding_tiles=settings.padding_tiles == "skip",
    )
    build_s = time.perf_counter() - t0
    info = {
        "engine": "continuous",
        "build_s": build_s,
        "graph_capture_s": engine.graph_capture_s,
        "cuda_graphs": engine.graph_capture_s > 0,
        "slots": engine.max_slots,
        "max_seq_len": engine.max_seq_len,
        "cache_bytes": engine.cache.nbytes,
        "eos_token_ids": sorted(engine.eos_token_ids),
        "lm_head_rows": engine.parts.geometry.vocab_size,
    }
    log(
        f"{label}: engine ready in {build_s:.1f} s: {engine.max_slots} slots of "
        f"{engine.max_seq_len} tokens, caches {engine.cache.nbytes / 2**30:.2f} GiB, graph "
        f"capture {engine.graph_capture_s:.1f} s"
    )
    executor = ContinuousExecutor(engine, reader)
    return Target(
        label,
        executor,
        images,
        engine.max_slots,
        max_wait_s=settings.max_wait_s,
        engine=engine,
        info=info,
    )


@dataclass
class Schedule:
    """How jobs arrive: a closed loop of ``concurrency`` jobs in flight (for at most
    ``window_s`` seconds of arrivals, if given), or at ``offsets`` (seconds from the start,
    e.g. Poisson)."""

    kind: str  # "closed" | "poisson"
    concurrency: int = 1
    offsets: Sequence[float] = ()
    rate: float | None = None
    window_s: float | None = None

    @classmethod
    def closed(cls, concurrency: int, window_s: float | None = None) -> Schedule:
        return cls("closed", concurrency=max(1, concurrency), window_s=window_s)

    @classmethod
    def poisson(cls, offsets: Sequence[float], rate: float) -> Schedule:
        return cls("poisson", offsets=list(offsets), rate=rate)


@dataclass
class RunLog:
    """Everything one run (one schedule on one target) left behind.

    ``batches`` holds one ``[start, end, rows]`` per executor step: a batch of (a), (b),
    (cb), one engine step (admission and a decode step) of (c). A windowed closed loop plans
    as many requests as arrived in its window (``windowed``).
    """

    name: str
    schedule: str
    rate: float | None
    concurrency: int | None
    n_planned: int
    t0: float = 0.0
    t1: float = 0.0
    records: list[dict] = field(default_factory=list)
    batches: list[list[float]] = field(default_factory=list)
    stopped_early: bool = False
    windowed: bool = False
    engine: dict[str, float] | None = None  # engine counter deltas over the run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def drive(
    target: Target,
    specs: Sequence[RequestSpec],
    image_of: Callable[[RequestSpec], bytes],
    schedule: Schedule,
    *,
    name: str,
    stop_at: float,
) -> RunLog:
    """Serve ``specs`` under ``schedule`` with the batcher's loop; no new arrival after epoch
    ``stop_at`` (nor after the closed loop's window). Jobs already arrived are always served."""
    n = len(specs)
    ex = target.executor
    run = RunLog(
        name=name,
        schedule=schedule.kind,
        rate=schedule.rate,
        concurrency=schedule.concurrency if schedule.kind == "closed" else None,
        n_planned=n,
        windowed=schedule.kind == "closed" and schedule.window_s is not None,
    )
    pending: deque[Job] = deque()
    inside: dict[str, Job] = {}
    cond = threading.Condition()
    state = {"next": 0, "done": False, "cut": False, "window_end": math.inf}
    progress = Progress(f"{target.label} {name}", n)
    jobs = [Job(spec, image_of(spec)) for spec in specs]
    static = math.isinf(target.max_wait_s)

    def arrive_next() -> None:  # holds cond
        if state["done"]:
            return
        now = time.time()
        if state["next"] >= n or now >= state["window_end"] or now >= stop_at:
            state["done"] = True
            state["cut"] = state["next"] < n and now >= stop_at and not run.windowed
            cond.notify()
            return
        job = jobs[state["next"]]
        state["next"] += 1
        job.arrival = now
        pending.append(job)
        cond.notify()

    def take() -> list[Job] | None:
        """As ``Batcher._take``: jobs to admit now ([] if none but the executor has work)."""
        with cond:
            while True:
                busy = ex.has_work()
                room = ex.room()
                wait = target.max_wait_s
                if busy or (static and state["done"]):
                    wait = 0.0
                decision = decide_batch(
                    len(pending) if room else 0,
                    pending[0].arrival if pending else None,
                    time.time(),
                    max_batch_size=max(room, 1),
                    max_wait_s=wait,
                )
                if decision.take:
                    return [pending.popleft() for _ in range(decision.take)]
                if busy:
                    return []
                if state["done"] and not pending:
                    return None
                timeout = decision.wait_s
                cond.wait(0.5 if timeout is None or math.isinf(timeout) else min(timeout, 0.5))

    def finish(outcomes: list[Outcome], rows: int) -> None:
        end = time.time()
        for outcome in outcomes:
            job = inside.pop(outcome.task_id)
            result = outcome.result or {}
            error = None
            if outcome.error is not None:
                error = f"{type(outcome.error).__name__}: {outcome.error}"
            run.records.append(
                {
                    "index": job.spec.index,
                    "tiles": job.spec.tiles,
                    "expected_tokens": job.spec.answer_tokens,
                    "arrival": job.arrival,
                    "start": job.start,
                    "end": end,
                    "batch_size": rows,
                    "answer_tokens": result.get("answer_tokens"),
                    "prompt_tokens": result.get("prompt_tokens"),
                    "error": error,
                }
            )
        if outcomes:
            progress.advance(len(outcomes), f"rows {rows}")
            if schedule.kind == "closed":
                with cond:
                    for _ in outcomes:
                        arrive_next()

    feeder = None
    if target.engine is not None:
        target.engine.stats.longest_decode_gap_ms = 0.0  # a maximum: this run's alone
    counters0 = target.engine_counters()
    run.t0 = time.time()
    if schedule.window_s is not None:
        state["window_end"] = run.t0 + schedule.window_s
    if schedule.kind == "closed":
        with cond:
            for _ in range(schedule.concurrency):
                arrive_next()
    else:
        offsets = list(schedule.offsets)[:n]

        def feed() -> None:
            for offset in offsets:
                if run.t0 + offset >= stop_at:
                    break
                time.sleep(max(0.0, run.t0 + offset - time.time()))
                with cond:
                    arrive_next()
            with cond:
                state["done"] = True
                cond.notify()

        feeder = threading.Thread(target=feed, name="bench-feeder", daemon=True)
        feeder.start()

    while (taken := take()) is not None:
        if taken:
            now = time.time()
            for job in taken:
                job.start = now
                inside[job.task_id] = job
            finish(ex.admit([target.message(job) for job in taken]), 0)
        if ex.has_work():
            # The executors isolate a request's failure themselves: an exception here means
            # the executor is broken, and it ends the mode.
            start = time.time()
            report = ex.step()
            run.batches.append([start, time.time(), report.rows])
            finish(report.outcomes, report.rows)
    if feeder is not None:
        feeder.join(1.0)
    progress.close()
    run.t1 = time.time()
    if run.windowed:
        run.n_planned = state["next"]
    run.stopped_early = state["cut"] or len(run.records) < run.n_planned
    counters1 = target.engine_counters()
    if counters0 is not None and counters1 is not None:
        run.engine = {k: counters1[k] - counters0[k] for k in ENGINE_COUNTERS}
        run.engine["longest_decode_gap_ms"] = target.engine.stats.longest_decode_gap_ms
    return run


def serve_now(target: Target, jobs: list[Job]) -> list[Outcome]:
    """Admit ``jobs`` at once and step until the executor is idle; one outcome per job."""
    now = time.time()
    for job in jobs:
        job.arrival = job.arrival or now
    outcomes = {o.task_id: o for o in target.executor.admit([target.message(j) for j in jobs])}
    while target.executor.has_work():
        outcomes.update((o.task_id, o) for o in target.executor.step().outcomes)
    return [outcomes[job.task_id] for job in jobs]


def serve_alone(target: Target, spec: RequestSpec, data: bytes) -> tuple[float, Outcome]:
    """One request on an idle target: its seconds from arrival to answer, and its outcome."""
    t0 = time.perf_counter()
    outcome = serve_now(target, [Job(spec, data, arrival=time.time())])[0]
    seconds = time.perf_counter() - t0
    if outcome.error is not None:
        raise RuntimeError(f"{target.label}: a lone request failed: {outcome.error}")
    return seconds, outcome


def probe_step_ms(
    target: Target, spec: RequestSpec, images: Sequence[bytes], *, k: int
) -> dict[str, float]:
    """Decode ms per step at batch 1 through ``target``'s own path: (time of a ``1 + k``-token
    answer - time of a 1-token answer) / ``k``, best of ``len(images) // 2`` each. Every
    request has its own image (so no engine reuses an image's cross-attention cache). With an
    engine, also its own timer's decode ms per step (``engine_step_ms``)."""
    repeats = max(1, len(images) // 2)
    engine_ms: list[float] = []

    def timed(tokens: int, data: bytes) -> float:
        before = target.engine_counters()
        seconds, _ = serve_alone(target, dataclasses.replace(spec, answer_tokens=tokens), data)
        after = target.engine_counters()
        if before and after and after["decode_steps"] > before["decode_steps"]:
            steps = after["decode_steps"] - before["decode_steps"]
            engine_ms.append((after["decode_ms"] - before["decode_ms"]) / steps)
        return seconds

    one = min(timed(1, images[i]) for i in range(repeats))
    many = min(timed(1 + k, images[repeats + i]) for i in range(repeats))
    out = {"first_token_ms": one * 1000.0, "step_ms": (many - one) / k * 1000.0, "k": k}
    if engine_ms:
        out["engine_step_ms"] = min(engine_ms)
    return out


def warm_up(target: Target, spec: RequestSpec, data: bytes) -> float:
    """One short request, so kernels and allocator are warm; returns its seconds."""
    return serve_alone(target, dataclasses.replace(spec, answer_tokens=2), data)[0]
