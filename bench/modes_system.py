"""Modes (d) and (d2), the whole system: the load generator process -> Redis -> the Celery
worker process(es) started by the worker's own command line."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

from bench.gpu_sampler import GpuSampler
from bench.models import ensure_batch
from bench.progress import log
from bench.report import headline, saturated, summarize_run
from bench.state import Bench, SkipMode, rate_start, rates
from bench.system import SystemConfig, WorkerProcess, flush_redis, run_loadgen
from bench.workload import poisson_arrivals


def mode_d(bench: Bench, key: str) -> None:
    """(d): one worker process (the plain ``celery worker`` command)."""
    system_mode(bench, key, ())


def mode_d2(bench: Bench, key: str) -> None:
    """(d2): ``vlmq worker --gpus`` with two GPUs, one worker each, twice (d)'s requests in
    flight; no probe nor arrival rates (the closed loop is what it is compared on)."""
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    # The workers pin by VLMQ_GPU, which replaces CUDA_VISIBLE_DEVICES: name the same cards.
    gpus = tuple(visible[:2]) if all(g.isdigit() for g in visible[:2]) else ("0", "1")
    system_mode(bench, key, gpus)


def gpu_window(bench: Bench, gpus: tuple[str, ...]):
    """The sampling window function for ``gpus``: the run's sampler alone, or with a
    sampler per other GPU (the mean utilisation over the GPUs, the largest memory peak);
    and those extra samplers, to stop."""
    if bench.sampler is None or bench.sampler.source != "nvml" or len(gpus) < 2:
        return None, []
    uuids = bench.results["device"].get("uuids") or []
    extra = [
        GpuSampler(index=int(g), uuid=uuids[i] if i < len(uuids) else None).start()
        for i, g in enumerate(gpus[1:], start=1)
    ]
    samplers = [bench.sampler, *extra]

    def window(t0: float, t1: float) -> dict:
        parts = [s.window(t0, t1) for s in samplers]
        utils = [p["util_mean"] for p in parts if p["util_mean"] is not None]
        if not utils:
            return parts[0]
        return {
            "util_mean": sum(utils) / len(utils),
            "util_max": max(p["util_max"] or 0.0 for p in parts),
            "mem_peak": max(p["mem_peak"] or 0.0 for p in parts),
            "n": sum(p["n"] for p in parts),
            "per_gpu": [p["util_mean"] for p in parts],
        }

    return window, extra


def system_mode(bench: Bench, key: str, gpus: tuple[str, ...]) -> None:
    """The whole system: producer -> Redis -> Celery worker(s), load generator in its own
    process; with ``gpus``, ``vlmq worker --gpus`` starts one worker per GPU."""
    mode = bench.start_mode(key, key)
    stop_at = bench.mode_stop_at(key)
    a = bench.args
    if bench.model_dir is None:
        raise SkipMode("no saved model to load")
    slots = bench.engine_slots or ensure_batch(bench)
    workers = max(1, len(gpus))
    on_cuda = a.device.startswith("cuda")
    flush_redis(a.redis_url)
    config = SystemConfig(
        redis_url=a.redis_url,
        model_dir=bench.model_dir,
        device="cuda" if on_cuda else "cpu",
        precision="bf16" if on_cuda else "fp32",
        max_batch=slots,
        max_wait_ms=a.max_wait_ms,
        out_dir=a.out,
        engine="continuous",
        max_new_tokens=bench.limits.max_new_tokens,
        padding_tiles=a.padding_tiles,
        gpu_memory_gib=a.gpu_memory_gib,
        tag=key,
        gpus=gpus,
    )
    mode.update(batch=slots, max_wait_ms=a.max_wait_ms, workers=workers, gpus=list(gpus))
    bench.reset_peak()
    t0 = time.time()
    worker = WorkerProcess(config)
    window_of, extra_samplers = gpu_window(bench, gpus)
    try:
        worker.start()
        ready_s = worker.wait_ready(max(10.0, stop_at - time.time()))
        mode["worker"] = {"ready_s": ready_s, **worker.timings()}
        if gpus:
            mode["worker"]["nodes"] = sorted(set(worker.ready_nodes()))
        mode["engine"] = {"engine": config.engine}
        log(f"{key}: {workers} worker(s) ready in {ready_s:.1f} s ({worker.timings()})")
        bench.save()
        source = "c" if (bench.results["modes"].get("c") or {}).get("probe") else "d"
        drain = bench.drain_estimate(source)
        rate_fractions = [] if gpus else rates(a.rates_d)
        rates_time = len(rate_fractions) * (a.rate_window_s + drain)
        # 10 s: the probe's six lone requests and the worker's warm shutdown.
        spare = (
            stop_at
            - time.time()
            - 10.0
            - bench.drain_estimate(source, queued=2 * slots)
            - rates_time
        )
        window = max(1.0, min(a.closed_window_s, spare))
        timeout = max(30.0, stop_at - time.time() + 60)
        runs = [
            {"name": "closed", "schedule": "closed",
             "n": bench.plan_closed(key, slots, window, engines=workers),
             "concurrency": 2 * slots * workers, "window_s": window,
             "max_s": max(1.0, stop_at - time.time())},
        ]  # fmt: skip
        if not gpus:
            runs.insert(0, {"name": "probe", "schedule": "probe", "k": a.probe_tokens,
                            "index": bench.probe_spec.index, "repeats": 2,
                            "lone_tokens": bench.median_answer})  # fmt: skip
        logs, probe = run_loadgen(
            config,
            bench.workload.to_dict(),
            runs,
            stop_at=stop_at + 30,
            timeout_s=timeout,
            alive=worker.alive,
        )
        mode["probe"] = probe
        if probe and probe.get("lone_s"):
            mode["lone"] = {
                "answer_tokens": bench.median_answer,
                "tiles": bench.probe_spec.tiles,
                "latency_s": probe["lone_s"],
            }
        capacity = bench.capacity_c
        if capacity is None and logs:
            capacity = saturated(summarize_run(logs[0].to_dict())).get("images_per_s")
        rate_runs = []
        for fraction in rate_fractions:
            if not capacity or time.time() + a.rate_window_s > stop_at:
                break
            rate = fraction * capacity
            n = max(3, round(rate * a.rate_window_s))
            arrivals_s = max(poisson_arrivals(n, rate, a.seed)[-1], a.rate_window_s) + 1.0
            rate_runs.append(
                {
                    "name": f"poisson x{fraction:g} ({rate:.2f}/s)",
                    "schedule": "poisson",
                    "rate": rate,
                    "n": n,
                    "start": rate_start(fraction),
                    "max_s": min(arrivals_s, max(1.0, stop_at - time.time())),
                    "seed": a.seed,
                }
            )
        if rate_runs:
            more, _ = run_loadgen(
                dataclasses.replace(config, tag="d-rates"),
                bench.workload.to_dict(),
                rate_runs,
                stop_at=stop_at + 30,
                timeout_s=timeout,
                alive=worker.alive,
            )
            logs += more
    finally:
        code = worker.stop(30.0)
        mode.setdefault("worker", {})["exit_code"] = code
        for sampler in extra_samplers:
            sampler.stop()
    served = Counter(r.get("worker") for run in logs for r in run.records if r.get("worker"))
    mode["tasks_per_worker"] = dict(served)
    bench.summarize(key, logs, t0, False, window_of)
    steady = ((headline(mode) or {}).get("steady") or {}) if window_of else {}
    if steady.get("window"):
        mode["gpu_util_per_gpu"] = window_of(*steady["window"]).get("per_gpu")
