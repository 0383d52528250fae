"""Numbers from a run's records: summaries, the steady window, ratios and targets, and the
results JSON (the tables that show them: :mod:`bench.tables`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The longest decode gap of a run (reset before it) and what it was made of.
LONGEST_GAP = (
    "longest_decode_gap_ms", "longest_gap_admit_ms", "longest_gap_read_ms",
    "longest_gap_admit_parts", "longest_gap_gc_ms",
)  # fmt: skip
MODE_ORDER = ["a", "b", "cb", "c", "d", "d2", "nf4", "fp8"]
MODE_LABELS = {
    "a": "(a) generate, one at a time",
    "b": "(b) generate, static batches",
    "cb": "(cb) worker batch executor, in process",
    "c": "(c) worker continuous engine, in process",
    "d": "(d) producer -> Redis -> Celery worker",
    "d2": "(d2) producer -> Redis -> 2 Celery workers, one per GPU",
    "nf4": "(c) worker default executor, nf4 weights",
    "fp8": "(c) worker default executor, fp8 weights",
}
GIB = 1024**3
#: Goals of the issue that set them (decode ms/step at batch 1: on an H100).
GOALS = {
    "step_ms": 8.5,  # issue 4
    "vs_a": 8.0,  # issue 4
    "vs_b": 2.5,  # issue 4
    "gpu_util": 90.0,  # issue 4
    "d_vs_c": 0.95,  # issues 4 and 10
    "half_load_vs_lone": 1.3,  # issue 10 (issue 4: 1.5)
    "ready_s": 60.0,  # issue 10 (issue 4: 120)
    "d2_vs_d": 1.9,  # issue 4
    "gap_steps": 3.0,  # issue 10
    "step_vs_floor": 1.25,  # issue 11, batch 1
    "full_step_vs_floor": 1.30,  # issue 11, at FULL_ROWS decoding rows or more
}
#: Issue 11's second goal holds from this many decoding rows.
FULL_ROWS = 48
#: Issue 12, per quantized mode: (decode step at batch 1 / bf16's at most, saturated tok/s /
#: bf16's at least).
QUANTIZED_GOALS = {"nf4": (0.50, 1.0), "fp8": (0.65, 1.3)}
#: Issue 12's memory goal for nf4: (slots at least, of this many tokens, within this cap in GiB).
NF4_MEMORY_GOAL = (16, 2560, 24)
#: Issue 10's baseline: (c)'s saturated throughput before the admission work, per card kind
#: and answer-length scale, as (tok/s, img/s or None, where it was measured); and the factor
#: the issue asks for at each scale.
THROUGHPUT_BEFORE = {
    ("H200", 0.25): (464.0, 7.23, "H200, 2026-12-02, main at 669e261"),
    ("H200", 1.0): (1433.0, None, "H200, 2026-12-02, main at 669e261"),
    ("H100", 0.25): (443.2, 6.99, "H100, run 3, 2026-11-26"),
}
THROUGHPUT_GAIN = {0.25: 3.0, 1.0: 1.5}


def card_kind(name: str) -> str | None:
    """``H100`` or ``H200`` where the device name says so."""
    return next((kind for kind in ("H200", "H100") if kind in name), None)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear between the closest ranks."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_run(run: dict, window: Callable[[float, float], dict] | None = None) -> dict:
    """Throughput, latency and batching of one run (a closed loop or one arrival rate)."""
    records = run["records"]
    ok = [r for r in records if r.get("error") is None and r.get("answer_tokens") is not None]
    failed = [r for r in records if r not in ok]
    short = [r for r in ok if r["answer_tokens"] < r["expected_tokens"]]
    out: dict[str, Any] = {
        "name": run["name"],
        "schedule": run["schedule"],
        "offered_rate": run.get("rate"),
        "concurrency": run.get("concurrency"),
        "n_planned": run["n_planned"],
        "n_done": len(records),
        "n_ok": len(ok),
        "n_failed": len(failed),
        "n_short": len(short),
        "errors": sorted({str(r.get("error")) for r in failed})[:5],
        "stopped_early": run.get("stopped_early", False),
    }
    if not ok:
        return out
    t_first = min(r["arrival"] for r in records)
    t_last = max(r["end"] for r in records)
    duration = max(t_last - t_first, 1e-9)
    latencies = [r["end"] - r["arrival"] for r in ok]
    tokens = sum(r["answer_tokens"] for r in ok)
    batches = run.get("batches") or []
    sizes = [b[2] for b in batches]
    mean_batch = sum(sizes) / len(sizes) if sizes else None
    engine = run.get("engine") or {}
    if engine.get("decode_steps"):
        # Rows of the engine's decode steps (each admitted request's first token is prefill's).
        mean_batch = (engine["tokens"] - engine["admitted"]) / engine["decode_steps"]
        out["engine_step_ms"] = engine["decode_ms"] / engine["decode_steps"]
        if engine.get("longest_decode_gap_ms") is not None:
            out["longest_decode_gap_ms"] = engine["longest_decode_gap_ms"]
            out["longest_decode_gap_steps"] = (
                engine["longest_decode_gap_ms"] / out["engine_step_ms"]
            )
            for key in LONGEST_GAP[1:]:
                out[key] = engine.get(key)
    if engine.get("admitted") and engine.get("vision_ms") is not None:
        # Per admitted request: GPU time of each admission phase, and host launch time.
        out["admission_ms"] = {
            phase: engine[key] / engine["admitted"]
            for phase, key in (("vision", "vision_ms"), ("projector_cross_kv", "cross_kv_ms"),
                               ("text_prefill", "text_prefill_ms"),
                               ("host", "admission_host_ms"))
        }  # fmt: skip
    out.update(
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration,
        images_per_s=len(ok) / duration,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        latency_p99_s=percentile(latencies, 99),
        latency_mean_s=sum(latencies) / len(latencies),
        mean_answer_tokens=tokens / len(ok),
        mean_prompt_tokens=_mean([r.get("prompt_tokens") for r in ok]),
        n_batches=len(batches),
        mean_batch=mean_batch,
        max_batch=max(sizes) if sizes else None,
        window=[t_first, t_last],
    )
    if window is not None:
        w = window(t_first, t_last)
        out.update(
            gpu_util_mean=w["util_mean"], gpu_util_max=w["util_max"], nvml_mem_peak=w["mem_peak"]
        )
    if run["schedule"] == "closed" and run.get("windowed"):
        out["steady"] = steady_state(run, ok, window)
    return out


def steady_state(
    run: dict, ok: list[dict], window: Callable[[float, float], dict] | None = None
) -> dict | None:
    """Throughput of a windowed closed loop while it was saturated: from the answer that
    completes its first half-concurrency (the initial fill is over) to its last arrival
    (after which fewer requests are in flight). Each request's tokens count as spread evenly
    over its time in the executor, so requests crossing the window's edges count in part."""
    arrivals = [r["arrival"] for r in run["records"]]
    ends = sorted(r["end"] for r in ok)
    k = max(1, (run.get("concurrency") or 2) // 2)
    if len(ends) <= k or not arrivals:
        return None
    w0, w1 = ends[k - 1], max(arrivals)
    if w1 - w0 < 0.5:
        return None
    tokens = requests = 0.0
    for r in ok:
        start, end = r.get("start") or r["arrival"], r["end"]
        if end > start:
            share = max(0.0, min(end, w1) - max(start, w0)) / (end - start)
        else:
            share = 1.0 if w0 <= end <= w1 else 0.0
        tokens += share * r["answer_tokens"]
        requests += share
    duration = w1 - w0
    out: dict[str, Any] = {
        "window": [w0, w1],
        "duration_s": duration,
        "output_tokens_per_s": tokens / duration,
        "images_per_s": requests / duration,
    }
    inside = [b for b in run.get("batches") or [] if b[0] >= w0 and b[1] <= w1]
    # Rows that decoded (an engine step's requests still waiting for their prefill are not
    # counted; a step that did not decode is left out); batch executors: every row.
    rows = [b[3] if len(b) > 3 else b[2] for b in inside]
    rows = [r for r in rows if r is not None]
    if rows:
        out["mean_rows"] = sum(rows) / len(rows)
    if window is not None:
        w = window(w0, w1)
        out.update(gpu_util_mean=w["util_mean"], gpu_util_max=w["util_max"])
    return out


def saturated(summary: dict) -> dict:
    """A closed-loop summary with its steady-state figures, where it has them, in place of the
    whole run's (ramp and drain included)."""
    steady = summary.get("steady")
    return {**summary, **steady} if steady else summary


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def throughput_ratio(
    top: dict, bottom: dict, metric: str = "output_tokens_per_s"
) -> tuple[float | None, str]:
    """``top``'s closed-loop ``metric`` over ``bottom``'s, like for like: both steady windows
    where both runs have one, else both whole loops (a steady window set against a whole loop,
    ramp and drain included, would flatter the first). Returns the ratio and which it used."""
    if top.get("steady") and bottom.get("steady"):
        a, b, basis = top["steady"].get(metric), bottom["steady"].get(metric), "steady windows"
    else:
        a, b, basis = top.get(metric), bottom.get(metric), "whole closed loops"
    return (a / b if a and b else None), basis


def headline(mode: dict) -> dict | None:
    """The saturating closed-loop run's summary of a mode, if it has one."""
    for s in mode.get("summaries", []):
        if s["schedule"] == "closed" and s.get("n_ok"):
            return s
    return None


def add_ratios(results: dict) -> None:
    """Each mode's saturated throughput over (a)'s, (b)'s and (cb)'s, and the issue-4
    targets (``results["targets"]``), in place."""
    modes = results.get("modes", {})
    bases = {k: headline(modes[k]) for k in ("a", "b", "cb") if k in modes}
    for mode in modes.values():
        h = headline(mode)
        mode["ratios"] = {}
        if h is None:
            continue
        for base_key, base in bases.items():
            if base is None:
                continue
            for metric in ("output_tokens_per_s", "images_per_s"):
                ratio, _ = throughput_ratio(h, base, metric)
                if ratio is not None:
                    mode["ratios"][f"{metric}_vs_{base_key}"] = ratio
    results["targets"] = targets(results)


def _half_load(mode: dict) -> dict | None:
    for s in mode.get("summaries", []):
        if s["schedule"] == "poisson" and s["name"].startswith("poisson x0.5 ") and s.get("n_ok"):
            return s
    return None


def targets(results: dict) -> list[dict]:
    """The targets of issues 4, 10 and 11, and issue 12's for each quantized mode that ran,
    each ``{"issue", "target", "value", "goal", "pass", "note"}`` (``pass`` None: not
    measured, or a figure without a goal), all from this run."""
    modes = results.get("modes", {})
    c = modes.get("c") or {}
    d = modes.get("d") or {}
    rows: list[dict] = []

    def row(issue: str, target: str, value: Any, fmt: str, goal: str, ok: bool | None,
            note: str = "") -> None:  # fmt: skip
        rows.append({
            "issue": issue, "target": target, "value": _f(value, fmt), "goal": goal,
            "pass": None if value is None else ok, "note": note,
        })  # fmt: skip

    probe = c.get("probe") or {}
    floor = c.get("floor") or {}
    step, floor1 = probe.get("step_ms"), (floor.get("batch1") or {}).get("floor_ms")
    card = (results.get("device") or {}).get("name", "")
    note = f"engine timer {_f(probe.get('engine_step_ms'), '{:.2f}')} ms"
    if "H100" not in card:
        note += f"; the goal is for an H100, this is {card or '?'}"
    goal = GOALS["step_ms"]
    row("4", "decode ms/step, batch 1, engine (c)", step, "{:.2f}", f"<= {goal}",
        step is not None and step <= goal, note)  # fmt: skip
    row("-", "bandwidth floor, batch 1", floor1, "{:.2f}", "-", None,
        "weights + 1 request's caches")  # fmt: skip
    engine1 = probe.get("engine_step_ms")
    value, goal = _ratio(engine1, floor1), GOALS["step_vs_floor"]
    row("11", "decode step at batch 1 / its floor (c)", value, "{:.3f}x", f"<= {goal}x",
        value is not None and value <= goal,
        f"engine timer {_f(engine1, '{:.2f}')} ms, floor {_f(floor1, '{:.2f}')} ms")  # fmt: skip
    h = saturated(headline(c) or {})
    at = floor.get("at_batch") or {}
    row("-", f"engine ms/step over the closed loop (c), mean decode batch "
        f"{_f(h.get('mean_batch'))}", h.get("engine_step_ms"), "{:.2f}", "-", None,
        "the engine's timer")  # fmt: skip
    row("-", f"bandwidth floor at the saturated batch {_f(at.get('batch'))} (c)",
        at.get("floor_ms"), "{:.2f}", "-", None,
        "weights + that many requests' caches")  # fmt: skip
    full, full_floor = c.get("probe_full") or {}, floor.get("full_batch") or {}
    engine_ms, floor_ms = full.get("engine_step_ms"), full_floor.get("floor_ms")
    rows_full = full.get("rows") or 0
    value, goal = _ratio(engine_ms, floor_ms), GOALS["full_step_vs_floor"]
    wall = _f(full.get("step_ms"), "{:.2f}")
    note = (f"engine timer {_f(engine_ms, '{:.2f}')} ms (wall {wall}), floor "
            f"{_f(floor_ms, '{:.2f}')} ms, only steps where every row decodes")  # fmt: skip
    scale = (results.get("workload") or {}).get("length_scale")
    if scale is not None and scale != 1.0:
        note += f"; issue 11 asks for --length-scale 1, this is x{scale}"
    full_goal = rows_full >= FULL_ROWS
    row("11", f"decode step at {rows_full or '-'} decoding rows / its floor (c)", value,
        "{:.3f}x", f"<= {goal}x" if full_goal else "-",
        value <= goal if full_goal and value is not None else None, note)  # fmt: skip
    ratios = c.get("ratios") or {}
    for base, key in (("a", "vs_a"), ("b", "vs_b"), ("cb", None)):
        value = ratios.get(f"output_tokens_per_s_vs_{base}")
        goal = GOALS.get(key) if key else None
        row("4" if goal else "-", f"saturated tok/s, (c) / ({base})", value, "{:.2f}x",
            f">= {goal}x" if goal else "-", value >= goal if goal and value else None,
            "mixed workload, saturating closed loop")  # fmt: skip
    _throughput_rows(row, h, card, scale)
    gap, goal = h.get("longest_decode_gap_steps"), GOALS["gap_steps"]
    row("10", "longest decode gap in the saturating loop (c), steps", gap, "{:.1f}",
        f"<= {goal:.0f}", gap is not None and gap <= goal,
        f"{_f(h.get('longest_decode_gap_ms'), '{:.0f}')} ms")  # fmt: skip
    util, goal = h.get("gpu_util_mean"), GOALS["gpu_util"]
    row("4", "GPU util % while saturated (c)", util, "{:.0f}", f">= {goal:.0f}",
        util is not None and util >= goal, "NVML, steady window of the closed loop")  # fmt: skip
    ch, dh, goal = headline(c) or {}, headline(d) or {}, GOALS["d_vs_c"]
    ratio, basis = throughput_ratio(dh, ch)
    row("4, 10", "saturated tok/s, (d) / (c)", ratio, "{:.3f}", f">= {goal}",
        ratio is not None and ratio >= goal, f"within 5%; {basis}")  # fmt: skip
    goal = GOALS["half_load_vs_lone"]
    for key, mode in (("c", c), ("d", d)):
        half, lone = _half_load(mode), (mode.get("lone") or {}).get("latency_s")
        value = half["latency_p50_s"] / lone if half and lone else None
        note = (f"p50 {_f(half and half['latency_p50_s'], '{:.2f}')} s at x0.5 load, lone "
                f"request ({(mode.get('lone') or {}).get('answer_tokens')} tokens) "
                f"{_f(lone, '{:.2f}')} s")  # fmt: skip
        row("10", f"p50 at half load / lone latency, ({key})", value, "{:.2f}", f"<= {goal}",
            value is not None and value <= goal, note)  # fmt: skip
    worker = d.get("worker") or {}
    ready, goal = worker.get("ready_s"), GOALS["ready_s"]
    note = (f"weights {_f(worker.get('load_s'))} s, engine {_f(worker.get('engine_s'))} s "
            f"(graphs {_f(worker.get('graph_capture_s'))} s), warm-up "
            f"{_f(worker.get('warmup_s'))} s")  # fmt: skip
    row("10", "worker ready, s (d)", ready, "{:.1f}", f"<= {goal:.0f}",
        ready is not None and ready <= goal, note)  # fmt: skip
    if "d2" in modes:
        d2 = modes["d2"]
        ratio, basis = throughput_ratio(headline(d2) or {}, dh)
        goal = GOALS["d2_vs_d"]
        note = f"two workers, one per GPU, vs one, same run; {basis}"
        if d2.get("status") == "skipped":
            note = f"(d2) skipped: {d2.get('reason')}"
        row("4", "saturated tok/s, (d2) / (d)", ratio, "{:.2f}x", f">= {goal}x",
            ratio is not None and ratio >= goal, note)  # fmt: skip
    for key, (step_goal, tok_goal) in QUANTIZED_GOALS.items():
        if key not in modes:
            continue
        quant = modes[key]
        value = _ratio((quant.get("probe") or {}).get("engine_step_ms"), engine1)
        row("12", f"decode step at batch 1, {key} / bf16 (c)", value, "{:.3f}x",
            f"<= {step_goal}x", value is not None and value <= step_goal,
            "engine timers, same run")  # fmt: skip
        ratio, basis = throughput_ratio(headline(quant) or {}, ch)
        row("12", f"saturated tok/s, {key} / bf16 (c)", ratio, "{:.3f}x", f">= {tok_goal}x",
            ratio is not None and ratio >= tok_goal, f"{basis}; issue 12 measures at "
            "--length-scale 1")  # fmt: skip
    if "nf4" in modes:
        _memory_row(row, modes["nf4"])
    return rows


def _throughput_rows(row: Callable[..., None], sat: dict, card: str, scale: float | None) -> None:
    """Issue 10's throughput goals: (c)'s saturated tok/s and img/s over the figures before
    the admission work on the same card kind at the same length scale."""
    before = THROUGHPUT_BEFORE.get((card_kind(card) or "", scale or 0.0))
    gain = THROUGHPUT_GAIN.get(scale or 0.0)
    if before is None or gain is None:
        row("10", "saturated tok/s, (c) / before the admission work", None, "{:.2f}x",
            "-", None, f"no figure from before on {card or '?'} at x{scale}")  # fmt: skip
        return
    tok_s, img_s, where = before
    for unit, mine, theirs in (("tok/s", sat.get("output_tokens_per_s"), tok_s),
                               ("img/s", sat.get("images_per_s"), img_s)):  # fmt: skip
        if theirs is None:
            continue
        value = _ratio(mine, theirs)
        row("10", f"saturated {unit}, (c) / before the admission work", value, "{:.2f}x",
            f">= {gain}x", value is not None and value >= gain,
            f"{_f(mine)} against {theirs:g} ({where}); the bench's saturated figure")  # fmt: skip


def _memory_row(row: Callable[..., None], nf4: dict) -> None:
    """Issue 12's memory goal, where nf4 ran under a memory cap (``--gpu-memory-gib``): its
    engine's slots, their length, and torch's peak reserved memory against the cap."""
    engine = nf4.get("engine") or {}
    cap = engine.get("memory_limit_gib")
    if not cap:
        return
    slots, tokens = engine.get("slots") or 0, engine.get("max_seq_len") or 0
    peak = (nf4.get("peak_mem") or {}).get("torch_peak_reserved")
    want_slots, want_tokens, want_cap = NF4_MEMORY_GOAL
    ok = (slots >= want_slots and tokens >= want_tokens and cap <= want_cap
          and peak is not None and peak <= cap * GIB)  # fmt: skip
    row("12", f"nf4 slots of {tokens} tokens within {cap} GiB", slots, "{:.0f}",
        f">= {want_slots} of {want_tokens:,} tokens within {want_cap} GiB", ok,
        f"torch peak reserved {_f(peak, '{:.2f}', 1 / GIB)} GiB over the mode")  # fmt: skip


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top and bottom else None


def write_json(results: dict, path: Path) -> None:
    """Write atomically, so a kill mid-write leaves the previous complete file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def write_table(out: Path, name: str, results: dict, markdown: str) -> None:
    """A standalone bench's results as ``out/name.json`` and its table as ``out/name.md``,
    the table printed too."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / f"{name}.json")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def _f(value: Any, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value * scale)
