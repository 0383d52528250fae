"""Modes (a) and (b): plain transformers ``generate``, one at a time and in static batches
(the baselines), each shape warmed up before it is timed."""

from __future__ import annotations

import time

from bench.drive import Schedule, drive, probe_step_ms, warm_up
from bench.models import ensure_batch
from bench.progress import log
from bench.state import Bench
from bench.targets import generate_target


def mode_a(bench: Bench, key: str) -> None:
    """(a): one request at a time; a closed loop of two, so the next one waits."""
    mode = bench.start_mode(key, "a")
    stop_at = bench.mode_stop_at(key)
    bench.reset_peak()
    t0 = time.time()
    target = generate_target(bench.model, bench.processor, 1, "(a)", limits=bench.limits)
    bench.warm_shape(mode, target, 1)
    mode["warmup_s"] = mode["warm"]["cold_s"]
    probe = probe_step_ms(
        target, bench.probe_spec, bench.fresh_images(4), k=bench.args.probe_tokens
    )
    mode["probe"] = probe
    log(f"a: batch 1: {probe['step_ms']:.1f} ms per decode step, first token "
        f"{probe['first_token_ms']:.0f} ms")  # fmt: skip
    specs = bench.workload.requests(bench.args.requests_a)
    per = lambda n: (probe["first_token_ms"] + (n - 1) * probe["step_ms"]) / 1000.0  # noqa: E731
    n = bench.sized_by_time([s.answer_tokens for s in specs], per, stop_at - time.time(), 2)
    if n < len(specs):
        log(f"a: {n} of {len(specs)} requests fit the budget")
    run = drive(
        target, specs[:n], bench.image_of, Schedule.closed(2), name="closed", stop_at=stop_at
    )
    bench.summarize(key, [run], t0, True)


def mode_b(bench: Bench, key: str) -> None:
    """(b): full static batches of the largest size that fits (every row runs to the
    batch's longest answer); a closed loop of two batches' worth."""
    mode = bench.start_mode(key, "b")
    stop_at = bench.mode_stop_at(key)
    b = ensure_batch(bench)
    mode["batch"] = b
    log(f"b: static batches of {b}")
    bench.reset_peak()
    t0 = time.time()
    a_probe = (bench.results["modes"].get("a") or {}).get("probe")
    if a_probe:
        mode["probe"] = {**a_probe, "note": "the same generate path as (a) at batch 1"}
    else:
        one = generate_target(bench.model, bench.processor, 1, "(b) probe", limits=bench.limits)
        warm_up(one, bench.probe_spec, bench.fresh_images(1)[0])
        mode["probe"] = probe_step_ms(
            one, bench.probe_spec, bench.fresh_images(4), k=bench.args.probe_tokens
        )
    target = generate_target(bench.model, bench.processor, b, "(b)", limits=bench.limits)
    bench.warm_shape(mode, target, b)
    batches = bench.args.batches
    est = bench.batch_estimate(key)
    if est:
        fit_n = max(1, int((stop_at - time.time()) // est))
        if fit_n < batches:
            log(f"b: {fit_n} of {batches} batches fit the budget (about {est:.0f} s each)")
            batches = fit_n
    specs = bench.workload.requests(batches * b)
    run = drive(
        target, specs, bench.image_of, Schedule.closed(2 * b), name="closed", stop_at=stop_at
    )
    bench.summarize(key, [run], t0, True)
