"""Serve requests through the worker's own loop (:func:`worker.inprocess.in_process_loop`).

:func:`drive` runs the loop on the calling thread: it takes buffered requests when the
executor has room (at once while it is busy, after the batch wait while it is idle), admits
them, steps while it has work. Arrivals come from a feeder thread (Poisson) or from
completions (closed loop), so with the engine new requests join free slots while others
decode. :func:`serve_now` serves a fixed set of requests the same way.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from bench.progress import Progress
from bench.report import LONGEST_GAP
from bench.stacks import StackSampler
from bench.targets import ENGINE_COUNTERS, Target, new_task_id
from bench.workload import RequestSpec
from worker.delivery import Completion
from worker.executor import Executor, Message, Outcome, StepReport
from worker.inprocess import Job, in_process_loop


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

    ``batches`` holds one ``[start, end, rows, decoding rows]`` per executor step: a batch of
    (a), (b), (cb), one engine step (admission and a decode step) of (c), whose decoding rows
    leave out the requests still waiting for their prefill. A windowed closed loop plans as
    many requests as arrived in its window (``windowed``).
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
    stacks: list[dict] | None = None  # where the loop thread's time went (--stacks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TimedSteps:
    """An executor that records each step as ``[start, end, rows, decoding rows]``; the first
    exception of a step is kept (``error``), and ``on_error`` is called with it."""

    def __init__(self, target: Target, on_error: Callable[[Exception], None]) -> None:
        self._executor: Executor = target.executor
        self._target = target
        self._on_error = on_error
        self.steps: list[list[float]] = []
        self.engine_ms: list[float] = []  # each step's decode time by the engine's timer
        self.error: Exception | None = None

    def room(self) -> int:
        return self._executor.room()

    def has_work(self) -> bool:
        return self._executor.has_work()

    def admit(self, messages: Sequence[Message]) -> list[Outcome]:
        return self._executor.admit(messages)

    def warmup(self) -> None:
        self._executor.warmup()

    def reset(self) -> None:
        self._executor.reset()

    def step(self) -> StepReport:
        before = self._target.engine_counters()
        start = time.time()
        try:
            report = self._executor.step()
        except Exception as exc:
            # The executors isolate a request's failure themselves: an exception here means
            # the executor is broken, and it ends the run.
            self.error = self.error or exc
            self._on_error(exc)
            raise
        decoding: float = report.rows
        after = self._target.engine_counters()
        if before is not None and after is not None:
            steps = after["decode_steps"] - before["decode_steps"]
            fresh = after["tokens"] - before["tokens"] - (after["admitted"] - before["admitted"])
            decoding = fresh / steps if steps else 0.0
            self.engine_ms.append(after["decode_ms"] - before["decode_ms"])
        self.steps.append([start, time.time(), report.rows, decoding])
        return report


def drive(
    target: Target,
    specs: Sequence[RequestSpec],
    image_of: Callable[[RequestSpec], bytes],
    schedule: Schedule,
    *,
    name: str,
    stop_at: float,
    sample_stacks: bool = False,
) -> RunLog:
    """Serve ``specs`` under ``schedule`` with the worker's loop; no new arrival after epoch
    ``stop_at`` (nor after the closed loop's window). Jobs already arrived are always served.
    ``sample_stacks``: sample the loop thread's stack (:mod:`bench.stacks`)."""
    n = len(specs)
    run = RunLog(
        name=name,
        schedule=schedule.kind,
        rate=schedule.rate,
        concurrency=schedule.concurrency if schedule.kind == "closed" else None,
        n_planned=n,
        windowed=schedule.kind == "closed" and schedule.window_s is not None,
    )
    # Made ahead in a thread of their own, in arrival order, as a producer's images exist
    # before it sends them: made at arrival (~9 ms a 4-tile JPEG) they took the loop thread,
    # which is the worker's engine thread, from its steps.
    painter = ThreadPoolExecutor(1, thread_name_prefix="bench-images")
    images = {spec.index: painter.submit(image_of, spec) for spec in specs}
    lock = threading.Lock()
    state = {"next": 0, "done": False, "cut": False, "window_end": math.inf}
    progress = Progress(f"{target.label} {name}", n)
    arrived: dict[str, tuple[RequestSpec, float]] = {}
    timed = TimedSteps(target, lambda _: loop.close())

    def arrive_next() -> None:
        with lock:
            if state["done"]:
                return
            now = time.time()
            if state["next"] >= n or now >= state["window_end"] or now >= stop_at:
                state["done"] = True
                state["cut"] = state["next"] < n and now >= stop_at and not run.windowed
                loop.close()
                return
            spec = specs[state["next"]]
            state["next"] += 1
        task_id, kwargs = target.message(new_task_id(), spec, images[spec.index].result(), now)
        arrived[task_id] = (spec, now)
        loop.add(Job(task_id, kwargs))

    def finish(completions: Sequence[Completion]) -> None:
        end = time.time()
        rows = 0
        for c in completions:
            spec, arrival = arrived.pop(c.item.id)
            outcome = c.outcome
            result = (outcome.result if outcome is not None else None) or {}
            error = None
            if outcome is not None and outcome.error is not None:
                error = f"{type(outcome.error).__name__}: {outcome.error}"
            rows = c.batch_size
            run.records.append(
                {
                    "index": spec.index,
                    "tiles": spec.tiles,
                    "expected_tokens": spec.answer_tokens,
                    "arrival": arrival,
                    "start": c.item.started_at,
                    "end": end,
                    "batch_size": c.batch_size,
                    "answer_tokens": result.get("answer_tokens"),
                    "prompt_tokens": result.get("prompt_tokens"),
                    "error": error,
                }
            )
        progress.advance(len(completions), f"rows {rows}")
        if schedule.kind == "closed":
            for _ in completions:
                arrive_next()

    loop, _ = in_process_loop(timed, max_wait_s=target.max_wait_s, on_finish=finish)
    if target.engine is not None:
        target.engine.stats.longest_decode_gap_ms = 0.0  # a maximum: this run's alone
    counters0 = target.engine_counters()
    if schedule.kind == "closed":
        for spec in specs[: schedule.concurrency]:
            images[spec.index].result()  # the first arrivals all come at once
    run.t0 = time.time()
    feeder = None
    if schedule.window_s is not None:
        state["window_end"] = run.t0 + schedule.window_s
    if schedule.kind == "closed":
        for _ in range(schedule.concurrency):
            arrive_next()
    else:
        offsets = list(schedule.offsets)[:n]

        def feed() -> None:
            for offset in offsets:
                if run.t0 + offset >= stop_at:
                    break
                time.sleep(max(0.0, run.t0 + offset - time.time()))
                arrive_next()
            with lock:
                state["done"] = True
            loop.close()

        feeder = threading.Thread(target=feed, name="bench-feeder", daemon=True)
        feeder.start()
    try:
        with StackSampler(threading.get_ident()) if sample_stacks else nullcontext() as sampler:
            loop.run()
    finally:
        painter.shutdown(cancel_futures=True)
    if sampler is not None:
        run.stacks = sampler.top()
    if feeder is not None:
        feeder.join(1.0)
    progress.close()
    if timed.error is not None:
        raise timed.error
    run.t1 = time.time()
    run.batches = timed.steps
    if run.windowed:
        run.n_planned = state["next"]
    run.stopped_early = state["cut"] or len(run.records) < run.n_planned
    counters1 = target.engine_counters()
    if counters0 is not None and counters1 is not None:
        run.engine = {k: counters1[k] - counters0[k] for k in ENGINE_COUNTERS}
        run.engine |= {key: getattr(target.engine.stats, key) for key in LONGEST_GAP}
    return run


def serve_now(target: Target, requests: Sequence[tuple[RequestSpec, bytes]]) -> list[Outcome]:
    """Serve ``requests`` (all arrived now) through the worker's loop until the executor is
    idle; one outcome per request, in order."""
    return serve_timed(target, requests)[0]


def serve_timed(
    target: Target, requests: Sequence[tuple[RequestSpec, bytes]]
) -> tuple[list[Outcome], TimedSteps]:
    """:func:`serve_now`, with the record of its steps."""
    outcomes: dict[str, Outcome] = {}

    def finish(completions: Sequence[Completion]) -> None:
        outcomes.update((c.item.id, c.outcome) for c in completions if c.outcome is not None)

    errors: list[Exception] = []
    timed = TimedSteps(target, errors.append)
    loop, _ = in_process_loop(timed, max_wait_s=0.0, on_finish=finish)
    now = time.time()
    ids = []
    for spec, data in requests:
        task_id, kwargs = target.message(new_task_id(), spec, data, now)
        ids.append(task_id)
        loop.add(Job(task_id, kwargs))
    loop.close()
    loop.run()
    if timed.error is not None:
        raise timed.error
    return [outcomes[task_id] for task_id in ids], timed


def serve_alone(target: Target, spec: RequestSpec, data: bytes) -> tuple[float, Outcome]:
    """One request on an idle target: its seconds from arrival to answer, and its outcome."""
    t0 = time.perf_counter()
    outcome = serve_now(target, [(spec, data)])[0]
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


def probe_full_batch(
    target: Target, spec: RequestSpec, data: bytes, rows: int, *, k: int
) -> dict[str, float]:
    """Decode ms per step with ``rows`` rows decoding and nothing being admitted: ``rows``
    requests of one image (encoded once, its cross-attention cache copied to every slot) with
    answers of ``k`` tokens, timed over the steps in which every row decoded and none was
    admitted (between the last admission and the first answer): the wall time between those
    steps' ends (``step_ms``) and, with an engine, its timer (``engine_step_ms``). Also where
    those steps sit in the answers (``mean_position``, tokens), for the floor's caches."""
    request = (dataclasses.replace(spec, answer_tokens=k), data)
    outcomes, timed = serve_timed(target, [request] * rows)
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
        raise RuntimeError(f"{target.label}: a full-batch probe request failed: {errors[0]}")
    full = [i for i, step in enumerate(timed.steps) if step[3] == rows]
    out: dict[str, float] = {"rows": rows, "k": k, "full_steps": len(full)}
    if len(full) < 2:
        return out
    ends = [timed.steps[i][1] for i in full]
    out["step_ms"] = (ends[-1] - ends[0]) / (len(full) - 1) * 1000.0
    # A step's position in the answers: how many decoding steps came before it.
    position = {i: n for n, i in enumerate(i for i, step in enumerate(timed.steps) if step[3])}
    out["mean_position"] = sum(position[i] for i in full) / len(full)
    if timed.engine_ms:
        out["engine_step_ms"] = sum(timed.engine_ms[i] for i in full[1:]) / (len(full) - 1)
    return out


def warm_up(target: Target, spec: RequestSpec, data: bytes) -> float:
    """One short request, so kernels and allocator are warm; returns its seconds."""
    return serve_alone(target, dataclasses.replace(spec, answer_tokens=2), data)[0]


def warm_shape(target: Target, spec: RequestSpec, images: Sequence[bytes]) -> dict[str, Any]:
    """Run a full batch of ``len(images)`` short requests (``spec``'s size) twice, untimed
    for the results: the first pays each new shape's one-time costs (cuDNN's plan build, the
    allocator), the second is what every later batch of that shape costs. Returns both."""

    def once() -> float:
        short = dataclasses.replace(spec, answer_tokens=2)
        t0 = time.perf_counter()
        outcomes = serve_now(target, [(short, data) for data in images])
        errors = [o.error for o in outcomes if o.error is not None]
        if errors:
            raise RuntimeError(f"{target.label}: a warm-up batch failed: {errors[0]}")
        return time.perf_counter() - t0

    cold_s = once()
    warm_s = once()
    return {
        "batch": len(images),
        "cold_s": cold_s,
        "warm_s": warm_s,
        "cold_cost_s": cold_s - warm_s,
    }
