"""The in-process modes and the load that drives them.

(a) :class:`GenerateServer` with batch 1: transformers ``generate`` one request at a time.
(b) :class:`GenerateServer` with static batches: ``generate`` over full batches, every row
    running to the batch's longest answer.
(c) :class:`EngineServer`: the worker's own :class:`~worker.executor.BatchExecutor` (runner,
    image decoding, validation) with batches cut by :func:`worker.policy.decide_batch`.

:func:`drive` feeds any of them a closed loop or Poisson arrivals, from a feeder thread, the
way the worker's batcher is fed: the server runs on the calling thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bench.progress import Progress, log
from bench.workload import RequestSpec
from producer.claimcheck import MemoryImageStore
from producer.images import decode_image
from producer.protocol import AnalysisRequest, Limits
from worker.executor import BatchExecutor
from worker.policy import decide_batch


@dataclass
class Job:
    """One request in flight: its spec, its image bytes, when it arrived (epoch seconds)."""

    spec: RequestSpec
    data: bytes
    arrival: float = 0.0


@dataclass(frozen=True)
class Served:
    """What a server says about one job."""

    answer_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None


class Server(Protocol):
    label: str
    max_batch: int

    def policy(
        self, pending: int, oldest: float | None, now: float, arrivals_done: bool
    ) -> tuple[int, float | None]: ...

    def serve(self, jobs: list[Job]) -> list[Served]: ...


def _prompt(processor: Any, question: str) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class GenerateServer:
    """Plain transformers ``generate`` over the jobs it is given (modes a and b).

    ``max_batch`` 1 is the naive baseline; above 1 it waits for a full batch (static
    batching) unless no more jobs will come. A batch runs to its longest answer; each job
    is answered with its own forced length.
    """

    def __init__(self, model: Any, processor: Any, max_batch: int, label: str) -> None:
        self.model = model
        self.processor = processor
        self.max_batch = max_batch
        self.label = label
        self.limits = Limits()
        gc = model.generation_config
        eos = gc.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = gc.pad_token_id
        # A reachable EOS (a model not built by the bench) is held off with min_new_tokens.
        self.min_new = any(e < model.get_output_embeddings().out_features for e in self.eos)

    def policy(
        self, pending: int, oldest: float | None, now: float, arrivals_done: bool
    ) -> tuple[int, float | None]:
        if pending >= self.max_batch:
            return self.max_batch, 0.0
        if pending and arrivals_done:
            return pending, 0.0
        return 0, None

    def serve(self, jobs: list[Job]) -> list[Served]:
        images = [[decode_image(job.data, self.limits)] for job in jobs]
        prompts = [_prompt(self.processor, job.spec.question) for job in jobs]
        inputs = self.processor(
            images=images,
            text=prompts,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        ).to(self.model.device)
        length = max(job.spec.answer_tokens for job in jobs)
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
        self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        generated = new.shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Served(answer_tokens=min(job.spec.answer_tokens, generated), prompt_tokens=p)
            for job, p in zip(jobs, prompt_tokens, strict=True)
        ]


class EngineServer:
    """The worker's batch executor, fed Celery-shaped messages (mode c)."""

    def __init__(
        self,
        executor: BatchExecutor,
        images: MemoryImageStore,
        max_batch: int,
        max_wait_s: float,
        label: str,
    ) -> None:
        self.executor = executor
        self.images = images
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.label = label

    def policy(
        self, pending: int, oldest: float | None, now: float, arrivals_done: bool
    ) -> tuple[int, float | None]:
        decision = decide_batch(
            pending, oldest, now, max_batch_size=self.max_batch, max_wait_s=self.max_wait_s
        )
        return decision.take, decision.wait_s

    def serve(self, jobs: list[Job]) -> list[Served]:
        messages = []
        for job in jobs:
            request = AnalysisRequest(
                image_key=self.images.put(job.data),
                question=job.spec.question,
                max_new_tokens=job.spec.answer_tokens,
                temperature=0.0,
                top_p=1.0,
                submitted_at=job.arrival,
            )
            messages.append((uuid.uuid4().hex, request.to_message()))
        outcomes = self.executor.run(messages)
        served = []
        for outcome in outcomes:
            if outcome.error is not None:
                served.append(Served(error=f"{type(outcome.error).__name__}: {outcome.error}"))
            else:
                result = outcome.result or {}
                served.append(
                    Served(
                        answer_tokens=result.get("answer_tokens"),
                        prompt_tokens=result.get("prompt_tokens"),
                    )
                )
        return served


@dataclass
class Schedule:
    """How jobs arrive: a closed loop of ``concurrency`` jobs in flight, or at ``offsets``
    (seconds from the start, e.g. Poisson)."""

    kind: str  # "closed" | "poisson"
    concurrency: int = 1
    offsets: Sequence[float] = ()
    rate: float | None = None

    @classmethod
    def closed(cls, concurrency: int) -> Schedule:
        return cls("closed", concurrency=max(1, concurrency))

    @classmethod
    def poisson(cls, offsets: Sequence[float], rate: float) -> Schedule:
        return cls("poisson", offsets=list(offsets), rate=rate)


@dataclass
class RunLog:
    """Everything one run (one schedule on one server) left behind."""

    name: str
    schedule: str
    rate: float | None
    concurrency: int | None
    n_planned: int
    t0: float = 0.0
    t1: float = 0.0
    records: list[dict] = field(default_factory=list)
    batches: list[list[float]] = field(default_factory=list)  # [start, end, size]
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def drive(
    server: Server,
    specs: Sequence[RequestSpec],
    image_of: Callable[[RequestSpec], bytes],
    schedule: Schedule,
    *,
    name: str,
    stop_at: float,
) -> RunLog:
    """Serve ``specs`` under ``schedule``; no new arrival after epoch ``stop_at``.

    The server runs on this thread, arrivals come from a feeder thread (Poisson) or from
    completions (closed loop). Jobs already arrived are always served.
    """
    n = len(specs)
    run = RunLog(
        name=name,
        schedule=schedule.kind,
        rate=schedule.rate,
        concurrency=schedule.concurrency if schedule.kind == "closed" else None,
        n_planned=n,
    )
    pending: deque[Job] = deque()
    cond = threading.Condition()
    state = {"next": 0, "done": False}
    progress = Progress(f"{server.label} {name}", n)
    jobs = [Job(spec, image_of(spec)) for spec in specs]

    def arrive_next() -> None:  # holds cond
        if state["next"] >= n or time.time() >= stop_at:
            state["done"] = True
            return
        job = jobs[state["next"]]
        state["next"] += 1
        job.arrival = time.time()
        pending.append(job)
        cond.notify()

    feeder = None
    run.t0 = time.time()
    if schedule.kind == "closed":
        with cond:
            for _ in range(schedule.concurrency):
                arrive_next()
    else:
        offsets = list(schedule.offsets)[:n]

        def feed() -> None:
            for offset in offsets:
                delay = run.t0 + offset - time.time()
                if run.t0 + offset >= stop_at:
                    break
                if delay > 0:
                    time.sleep(delay)
                with cond:
                    arrive_next()
            with cond:
                state["done"] = True
                cond.notify()

        feeder = threading.Thread(target=feed, name="bench-feeder", daemon=True)
        feeder.start()

    while True:
        with cond:
            batch: list[Job] = []
            while not batch:
                if not pending and state["done"]:
                    break
                oldest = pending[0].arrival if pending else None
                take, wait_s = server.policy(len(pending), oldest, time.time(), state["done"])
                if take:
                    batch = [pending.popleft() for _ in range(take)]
                else:
                    cond.wait(0.5 if wait_s is None else min(max(wait_s, 0.0), 0.5))
            if not batch:
                break
        start = time.time()
        try:
            served = server.serve(batch)
        except Exception as exc:
            log(f"{server.label}: a batch of {len(batch)} failed: {type(exc).__name__}: {exc}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            served = [Served(error=f"{type(exc).__name__}: {exc}") for _ in batch]
        end = time.time()
        run.batches.append([start, end, len(batch)])
        for job, result in zip(batch, served, strict=True):
            run.records.append(
                {
                    "index": job.spec.index,
                    "tiles": job.spec.tiles,
                    "expected_tokens": job.spec.answer_tokens,
                    "arrival": job.arrival,
                    "start": start,
                    "end": end,
                    "batch_size": len(batch),
                    "answer_tokens": result.answer_tokens,
                    "prompt_tokens": result.prompt_tokens,
                    "error": result.error,
                }
            )
        progress.advance(len(batch), f"batch {len(batch)}")
        if schedule.kind == "closed":
            with cond:
                for _ in batch:
                    arrive_next()
    if feeder is not None:
        feeder.join(1.0)
    progress.close()
    run.t1 = time.time()
    run.stopped_early = len(run.records) < n
    return run


def probe_step_ms(
    server: Server, spec: RequestSpec, data: bytes, *, k: int, repeats: int = 2
) -> dict[str, float]:
    """Decode ms per step at batch 1 through ``server``'s own path:
    (time of a ``1 + k``-token answer - time of a 1-token answer) / ``k``, best of ``repeats``."""

    def timed(tokens: int) -> float:
        job = Job(dataclasses.replace(spec, answer_tokens=tokens), data, arrival=time.time())
        t0 = time.perf_counter()
        result = server.serve([job])[0]
        if result.error:
            raise RuntimeError(f"probe failed: {result.error}")
        return time.perf_counter() - t0

    one = min(timed(1) for _ in range(repeats))
    many = min(timed(1 + k) for _ in range(repeats))
    return {"first_token_ms": one * 1000.0, "step_ms": (many - one) / k * 1000.0, "k": k}


def warm_up(server: Server, spec: RequestSpec, data: bytes) -> float:
    """One short request, so kernels and allocator are warm; returns its seconds."""
    t0 = time.perf_counter()
    server.serve([Job(dataclasses.replace(spec, answer_tokens=2), data, arrival=time.time())])
    return time.perf_counter() - t0
