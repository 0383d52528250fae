"""Modes (c), (cb) and the quantized ones: the worker's own executors, built by its factory
and driven by its loop, in process."""

from __future__ import annotations

import dataclasses
import time

import torch

from bench.drive import (
    Schedule,
    drive,
    probe_full_batch,
    probe_step_ms,
    serve_alone,
    warm_up,
)
from bench.model_factory import weight_bytes
from bench.models import ensure_batch, fitting_worker_target, free_model
from bench.progress import log
from bench.report import saturated, summarize_run
from bench.state import Bench, SkipMode, rate_start, rates
from bench.targets import Target, worker_target
from bench.workload import poisson_arrivals
from worker.model.loading import load_model


def mode_c(bench: Bench, key: str) -> None:
    """(c): the worker's default executor (the continuous engine), a saturating closed loop,
    then Poisson arrivals at fractions of its capacity."""
    mode = bench.start_mode(key, "c")
    stop_at = bench.mode_stop_at(key)
    b = bench.args.engine_slots or ensure_batch(bench)
    bench.reset_peak()
    t0 = time.time()
    target = fitting_worker_target(bench, bench.model, bench.processor, b, "(c)")
    try:
        mode.update(engine=target.info, batch=target.max_batch, max_wait_ms=bench.args.max_wait_ms)
        bench.engine_slots = target.max_batch
        t = time.perf_counter()
        target.executor.warmup()
        mode["warmup_s"] = time.perf_counter() - t
        # The worker's warm-up image is one tile; the probe's first 4-tile image would
        # pay for first-use costs (kernel selection) otherwise.
        warm_up(target, bench.probe_spec, bench.fresh_images(1)[0])
        bench.warm_shape(mode, target, target.max_batch)
        mode["probe"] = probe_step_ms(
            target, bench.probe_spec, bench.fresh_images(4), k=bench.args.probe_tokens
        )
        mode["lone"] = lone_latency(bench, target)
        p = mode["probe"]
        log(f"c: batch 1: {p['step_ms']:.1f} ms per decode step (engine timer "
            f"{p.get('engine_step_ms', float('nan')):.1f} ms), first token "
            f"{p['first_token_ms']:.0f} ms; a lone request of {bench.median_answer} tokens: "
            f"{mode['lone']['latency_s']:.2f} s")  # fmt: skip
        full = mode["probe_full"] = probe_full_batch(
            target, bench.probe_spec, bench.fresh_images(1)[0], target.max_batch,
            k=4 * bench.args.probe_tokens,
        )  # fmt: skip
        log(
            f"c: {full['rows']} rows decoding, nothing admitted ({full['full_steps']} steps): "
            f"{full.get('step_ms', float('nan')):.1f} ms per step (engine timer "
            f"{full.get('engine_step_ms', float('nan')):.1f} ms)"
        )
        runs = closed_and_rates(bench, key, target, rates(bench.args.rates_c), stop_at)
    finally:
        target = None
        bench.release_memory()
    bench.summarize(key, runs, t0, True)


def mode_cb(bench: Bench, key: str) -> None:
    """(cb): the worker's batch executor (``VLMQ_ENGINE=batch``), a saturating closed loop."""
    mode = bench.start_mode(key, "cb")
    stop_at = bench.mode_stop_at(key)
    b = ensure_batch(bench)
    bench.reset_peak()
    t0 = time.time()
    settings = dataclasses.replace(bench.settings(b), engine="batch")
    target = worker_target(bench.model, bench.processor, settings, "(cb)")
    t = time.perf_counter()
    target.executor.warmup()
    warm_up(target, bench.probe_spec, bench.fresh_images(1)[0])
    mode.update(
        warmup_s=time.perf_counter() - t,
        batch=b,
        max_wait_ms=bench.args.max_wait_ms,
        engine=target.info,
    )
    bench.warm_shape(mode, target, b)
    mode["probe"] = probe_step_ms(
        target, bench.probe_spec, bench.fresh_images(4), k=bench.args.probe_tokens
    )
    log(f"cb: batch 1: {mode['probe']['step_ms']:.1f} ms per decode step")
    runs = closed_and_rates(bench, key, target, [], stop_at)
    bench.summarize(key, runs, t0, True)


def mode_quant(bench: Bench, key: str) -> None:
    """nf4, fp8: the saved model loaded quantized, as the worker loads it, served by the
    executor the worker builds for that precision."""
    mode = bench.start_mode(key, key)
    if not bench.args.device.startswith("cuda"):
        raise SkipMode("quantized weights need a CUDA GPU")
    if bench.model_dir is None:
        raise SkipMode("no saved model to load")
    stop_at = bench.mode_stop_at(key)
    free_model(bench)
    bench.reset_peak()
    t0 = time.time()
    t = time.perf_counter()
    # Held on bench (not in locals) so free_model() really frees it, even after an error.
    bench.model, bench.processor = load_model(str(bench.model_dir), precision=key, device="cuda")
    torch.cuda.synchronize()
    mode["load_s"] = time.perf_counter() - t
    wb = weight_bytes(bench.model)
    mode.update(weight_bytes=wb["total"], decode_weight_bytes=wb["decode"])
    log(f"{key}: loaded in {mode['load_s']:.1f} s, weights {wb['total'] / 1e9:.2f} GB")
    try:
        runs = quant_runs(bench, key, mode, stop_at)
        bench.summarize(key, runs, t0, True)
    finally:
        free_model(bench)


def quant_target(bench: Bench, key: str, mode: dict) -> Target:
    """The worker's default executor (the continuous engine) on these weights; the batch
    executor when the engine cannot serve them (``mode["engine_fallback"]`` says why)."""
    b = bench.engine_slots or ensure_batch(bench)
    try:
        target = fitting_worker_target(
            bench, bench.model, bench.processor, b, f"({key})", precision=key
        )
        target.executor.warmup()
        # The executor's warm-up drops a failed answer: ask for one (4 tiles) and check it.
        serve_alone(target, bench.probe_spec_of(3), bench.fresh_images(1)[0])
        return target
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    target = None
    bench.release_memory()
    log(f"{key}: the continuous engine cannot serve these weights ({reason}); "
        "falling back to the batch executor")  # fmt: skip
    mode["engine_fallback"] = reason
    settings = dataclasses.replace(bench.settings(b, key), engine="batch")
    target = worker_target(bench.model, bench.processor, settings, f"({key})")
    target.executor.warmup()
    serve_alone(target, bench.probe_spec_of(3), bench.fresh_images(1)[0])
    return target


def quant_runs(bench: Bench, key: str, mode: dict, stop_at: float) -> list:
    """The quantized mode's probe and closed loop."""
    target = quant_target(bench, key, mode)
    try:
        mode.update(engine=target.info, batch=target.max_batch)
        bench.warm_shape(mode, target, target.max_batch)
        mode["probe"] = probe_step_ms(
            target, bench.probe_spec, bench.fresh_images(4), k=bench.args.probe_tokens
        )
        step = mode["probe"]["step_ms"]
        log(f"{key}: batch 1: {step:.1f} ms per decode step ({target.info['engine']})")
        if target.engine is not None:
            return closed_and_rates(bench, key, target, [], stop_at)
        n = bench.args.requests_quant or target.max_batch
        est = bench.batch_estimate(key)
        bf16_probe = (bench.results["modes"].get("cb") or {}).get("probe") or {}
        if est and bf16_probe.get("step_ms"):
            # The bf16 batch estimate, scaled by this precision's step-time ratio.
            est *= max(1.0, step / bf16_probe["step_ms"])
            room = stop_at - time.time()
            if est > room and n > 2:
                n = max(2, int(n * room / est))
                log(f"{key}: {n} requests fit the budget (a batch takes about {est:.0f} s)")
        specs = bench.workload.requests(n)
        schedule = Schedule.closed(2 * target.max_batch)
        return [drive(target, specs, bench.image_of, schedule, name="closed", stop_at=stop_at)]
    finally:
        target = None
        bench.release_memory()


def lone_latency(bench: Bench, target: Target) -> dict:
    """Arrival to answer of a lone request of the workload's median answer length (4-tile
    image), on an idle target: the mean of two."""
    spec = dataclasses.replace(bench.probe_spec, answer_tokens=bench.median_answer)
    runs = [serve_alone(target, spec, data)[0] for data in bench.fresh_images(2)]
    return {
        "answer_tokens": spec.answer_tokens,
        "tiles": spec.tiles,
        "runs_s": runs,
        "latency_s": sum(runs) / len(runs),
    }


def closed_and_rates(
    bench: Bench, key: str, target: Target, fractions: list[float], stop_at: float
) -> list:
    """A saturating closed loop (2 x batch in flight), then Poisson arrivals at ``fractions``
    x (c)'s saturated capacity. The engine's closed loop lasts ``--closed-window-s`` of
    arrivals; a batch executor's runs ``--batches`` batches."""
    a = bench.args
    b = target.max_batch
    if target.engine is not None:
        drain = bench.drain_estimate(key)
        left = stop_at - time.time() - bench.drain_estimate(key, queued=2 * b)
        spare = left - len(fractions) * (a.rate_window_s + drain)
        # The saturated figure is the one every ratio uses: it keeps at least half its window
        # and the arrival rates give way (each is skipped once no time is left for it).
        window = max(1.0, min(a.closed_window_s, max(spare, min(a.closed_window_s / 2, left))))
        n = bench.plan_closed(key, b, window)
        schedule = Schedule.closed(2 * b, window_s=window)
        log(f"{key}: closed loop of {2 * b} in flight for {window:.0f} s of arrivals")
    else:
        batches = a.batches
        est = bench.batch_estimate(key)
        if est:
            room = stop_at - time.time() - len(fractions) * (a.rate_window_s + est)
            batches = max(1, min(batches, int(room // est)))
        n = batches * b
        schedule = Schedule.closed(2 * b)
    specs = bench.workload.requests(n)
    closed = drive(target, specs, bench.image_of, schedule, name="closed", stop_at=stop_at,
                   sample_stacks=a.stacks and target.engine is not None)  # fmt: skip
    for row in closed.stacks or []:
        log(f"{key}: {row['phase']:>23} {row['ms']:>8.0f} ms  {row['where']}")
    runs = [closed]
    capacity = saturated(summarize_run(runs[0].to_dict())).get("images_per_s")
    if key == "c":
        bench.capacity_c = capacity
    for fraction in fractions:
        base = bench.capacity_c or capacity
        if not base:
            break
        if time.time() + a.rate_window_s > stop_at:
            log(f"{key}: no time left for rate x{fraction}")
            break
        rate = fraction * base
        n = max(3, round(rate * a.rate_window_s))
        offsets = poisson_arrivals(n, rate, a.seed)
        arrivals_s = max(offsets[-1], a.rate_window_s) + 1.0
        runs.append(
            drive(
                target,
                bench.workload.requests(n, start=rate_start(fraction)),
                bench.image_of,
                Schedule.poisson(offsets, rate),
                name=f"poisson x{fraction:g} ({rate:.2f}/s)",
                stop_at=min(stop_at, time.time() + arrivals_s),
            )
        )
    return runs
