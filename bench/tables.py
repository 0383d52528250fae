"""The tables of a run: console, Markdown, and the CLI over a results JSON.

``python -m bench.tables md RESULTS.json`` rewrites the Markdown next to a results JSON;
``python -m bench.tables merge OUT.json A.json B.json`` merges runs of the same card (modes
of later files win), e.g. a run of a,b,c,d and a run of nf4;
``python -m bench.tables compare A.json B.json`` prints the headline (saturated tok/s and its
ratios) of runs side by side, e.g. the default ``--length-scale`` beside ``--length-scale 1``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.report import (
    GIB,
    MODE_LABELS,
    MODE_ORDER,
    _f,
    add_ratios,
    headline,
    saturated,
    targets,
    write_json,
)
from worker.settings import QUANTIZED

TARGET_HEADER = ["issue", "target", "value", "goal", "pass", "note"]


def target_rows(results: dict) -> list[list[str]]:
    """The targets as table rows."""
    marks = {True: "PASS", False: "FAIL", None: "-"}
    return [
        [t["issue"], t["target"], t["value"], t["goal"], marks[t["pass"]], t["note"]]
        for t in results.get("targets") or targets(results)
    ]


def mode_rows(results: dict) -> list[list[str]]:
    """One row per mode: the headline numbers."""
    rows = []
    for key in MODE_ORDER:
        mode = results.get("modes", {}).get(key)
        if mode is None:
            continue
        h = headline(mode) or {}
        sat = saturated(h)
        probe = mode.get("probe") or {}
        floor = (mode.get("floor") or {}).get("batch1") or {}
        mem = mode.get("peak_mem") or {}
        ratios = mode.get("ratios") or {}
        status = mode.get("status", "?")
        if h.get("n_failed") or h.get("n_short"):
            status += f" ({h.get('n_failed', 0)} failed, {h.get('n_short', 0)} short)"
        rows.append(
            [
                MODE_LABELS.get(key, key),
                status,
                _f(probe.get("step_ms")),
                _f(floor.get("floor_ms")),
                _f(h.get("output_tokens_per_s")),
                _f(sat.get("output_tokens_per_s")),
                _f(sat.get("images_per_s"), "{:.2f}"),
                _f(h.get("latency_p50_s")),
                _f(h.get("latency_p95_s")),
                _f(h.get("latency_p99_s")),
                _f(sat.get("mean_rows") or h.get("mean_batch")),
                _f(sat.get("gpu_util_mean"), "{:.0f}"),
                _f(mem.get("peak_bytes"), "{:.1f}", 1 / GIB),
                _f(ratios.get("output_tokens_per_s_vs_a"), "{:.2f}x"),
                _f(ratios.get("output_tokens_per_s_vs_b"), "{:.2f}x"),
                _f(ratios.get("output_tokens_per_s_vs_cb"), "{:.2f}x"),
            ]
        )
    return rows


MODE_HEADER = [
    "mode", "status", "ms/step b=1", "floor ms b=1", "out tok/s", "sat tok/s", "sat img/s",
    "p50 s", "p95 s", "p99 s", "sat batch", "sat GPU util %", "peak GiB", "vs (a)", "vs (b)",
    "vs (cb)",
]  # fmt: skip
RATE_HEADER = [
    "mode", "run", "offered req/s", "img/s", "out tok/s", "p50 s", "p95 s", "p99 s",
    "mean batch", "GPU util %", "done/planned",
]  # fmt: skip


def _summaries(results: dict) -> Iterator[tuple[str, dict]]:
    """(mode, run summary) for every run of every mode, in the table order."""
    for key in MODE_ORDER:
        for summary in (results.get("modes", {}).get(key) or {}).get("summaries", []):
            yield key, summary


def rate_rows(results: dict) -> list[list[str]]:
    """One row per run of every mode (closed loop and each arrival rate)."""
    rows = []
    for key, s in _summaries(results):
        rows.append(
            [
                key,
                s["name"],
                _f(s.get("offered_rate"), "{:.2f}"),
                _f(s.get("images_per_s"), "{:.2f}"),
                _f(s.get("output_tokens_per_s")),
                _f(s.get("latency_p50_s")),
                _f(s.get("latency_p95_s")),
                _f(s.get("latency_p99_s")),
                _f(s.get("mean_batch")),
                _f(s.get("gpu_util_mean"), "{:.0f}"),
                f"{s.get('n_ok', 0)}/{s.get('n_planned', 0)}",
            ]
        )
    return rows


ADMISSION_HEADER = [
    "mode", "run", "vision ms", "projector + cross K/V ms", "text prefill ms", "host ms",
    "longest decode gap ms", "gap in steps",
    "of it admitting ms (images / prompts / install)", "of it reading ms",
    "of it collecting garbage ms",
]  # fmt: skip


def admission_rows(results: dict) -> list[list[str]]:
    """Per admitted request, one row per engine run: the GPU time of each admission phase
    (measured on the side stream, beside decode), the host time launching it, and the longest
    stall of the decoding rows with how much of it the engine thread spent admitting and
    taking launched steps' tokens (waiting for the GPU included), and how much Python's
    garbage collector took (in any thread: it holds the GIL)."""
    rows = []
    for key, s in _summaries(results):
        phases = s.get("admission_ms")
        if not phases:
            continue
        rows.append(
            [
                key,
                s["name"],
                *(_f(phases.get(p)) for p in ("vision", "projector_cross_kv",
                                               "text_prefill", "host")),
                _f(s.get("longest_decode_gap_ms"), "{:.0f}"),
                _f(s.get("longest_decode_gap_steps")),
                _admitting(s.get("longest_gap_admit_ms"), s.get("longest_gap_admit_parts")),
                _f(s.get("longest_gap_read_ms"), "{:.0f}"),
                _f(s.get("longest_gap_gc_ms"), "{:.0f}"),
            ]
        )  # fmt: skip
    return rows


def _admitting(total: float | None, parts: dict[str, float] | None) -> str:
    if total is None:
        return "-"
    if not parts:
        return f"{total:.0f}"
    return f"{total:.0f} ({' / '.join(f'{ms:.0f}' for ms in parts.values())})"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table for the console."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def facts(results: dict) -> list[str]:
    """The lines that say what was measured on what."""
    meta, dev = results.get("meta", {}), results.get("device", {})
    bw, model, wl = (
        results.get("bandwidth") or {},
        results.get("model") or {},
        results.get("workload") or {},
    )
    lines = [
        f"- card: {dev.get('name', '?')} ({_f(dev.get('total_memory'), '{:.1f}', 1 / GIB)} GiB), "
        f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
        f"CUDA {meta.get('cuda')}, date {meta.get('date')}",
        f"- command: `{meta.get('command', '?')}`",
        f"- model: {model.get('kind')} random weights, "
        f"{_f(model.get('parameters'), '{:.3f}', 1e-9)}B "
        f"parameters, {_f(model.get('weight_bytes'), '{:.2f}', 1e-9)} GB "
        f"({_f(model.get('decode_weight_bytes'), '{:.2f}', 1e-9)} GB read per decode step); "
        f"built in {_f(model.get('build_s'))} s, saved in {_f(model.get('save_s'))} s",
        f"- measured device-to-device bandwidth: {_f(bw.get('bytes_per_s'), '{:.0f}', 1e-9)} GB/s "
        f"(read + write of a {_f(bw.get('size_bytes'), '{:.0f}', 1 / GIB)} GiB `copy_`)",
        f"- workload: seed {wl.get('seed')}, tile {wl.get('tile_size')} px, 1-4 tiles, answer "
        f"lengths 16-512 tokens x {wl.get('length_scale')} (mean "
        f"{_f(wl.get('mean_answer_tokens'))}), forced (EOS unreachable), greedy",
    ]
    d = results.get("modes", {}).get("d", {})
    if d.get("worker"):
        w = d["worker"]
        lines.append(
            f"- (d) worker ready after {_f(w.get('ready_s'))} s (model load "
            f"{_f(w.get('load_s'))} s, engine {_f(w.get('engine_s'))} s: {w.get('slots', '?')} "
            f"slots of {w.get('max_seq_len', '?')} tokens, graph capture "
            f"{_f(w.get('graph_capture_s'))} s; warm-up {_f(w.get('warmup_s'))} s)"
        )
    d2 = results.get("modes", {}).get("d2", {})
    if d2.get("worker"):
        w = d2["worker"]
        lines.append(
            f"- (d2) {len(d2.get('gpus') or [])} workers (GPUs {','.join(d2.get('gpus') or [])}) "
            f"all ready after {_f(w.get('ready_s'))} s; requests served per worker: "
            f"{d2.get('tasks_per_worker') or '-'}; saturated GPU util per GPU: "
            f"{', '.join(_f(u, '{:.0f}') for u in d2.get('gpu_util_per_gpu') or []) or '-'} %"
        )
    for key in MODE_ORDER:
        mode = results.get("modes", {}).get(key, {})
        if mode.get("load_s") is not None and key in QUANTIZED:
            lines.append(f"- {key}: loaded by `load_model` in {_f(mode['load_s'])} s")
        engine = mode.get("engine") or {}
        if engine.get("engine") == "continuous" and "slots" in engine and key not in ("d", "d2"):
            asked = engine.get("slots_asked")
            graphs = "off"
            if engine.get("cuda_graphs"):
                graphs = f"captured in {_f(engine.get('graph_capture_s'))} s"
            lines.append(
                f"- {key}: continuous engine ready in {_f(engine.get('build_s'))} s: "
                f"{engine['slots']} slots"
                + (f" (asked {asked}; the memory planner fits no more)" if asked else "")
                + f" of {engine.get('max_seq_len')} tokens, caches "
                f"{_f(engine.get('cache_bytes'), '{:.2f}', 1 / GIB)} GiB, CUDA graphs {graphs}"
            )
        if mode.get("engine_fallback"):
            lines.append(
                f"- {key}: the continuous engine could not serve these weights, so this mode "
                f"ran the batch executor: {mode['engine_fallback']}"
            )
        floor = (mode.get("floor") or {}).get("at_batch")
        if floor:
            weights = _f(floor["weight_bytes"], "{:.2f}", 1e-9)
            caches = _f(floor["cache_bytes"], "{:.2f}", 1e-9)
            lines.append(
                f"- {key}: bandwidth floor at its saturated batch {_f(floor['batch'])}: "
                f"{_f(floor['floor_ms'])} ms/step (weights {weights} GB + caches {caches} GB)"
            )
        if mode.get("status") not in (None, "ok"):
            lines.append(
                f"- {key}: {mode.get('status')}: {mode.get('reason') or mode.get('error')}"
            )
    return lines


def markdown(results: dict) -> str:
    """The whole Markdown report of a run."""
    return "\n".join(
        [
            f"# vlmq benchmark: {results.get('device', {}).get('name', '?')}, "
            f"{results.get('meta', {}).get('date', '?')}",
            "",
            *facts(results),
            "",
            "## Targets (issues 4, 10, 11, 12)",
            "",
            md_table(TARGET_HEADER, target_rows(results)),
            "",
            "## Modes (saturating closed loop)",
            "",
            md_table(MODE_HEADER, mode_rows(results)),
            "",
            "## Every run (closed loop and arrival rates)",
            "",
            md_table(RATE_HEADER, rate_rows(results)),
            "",
            *_admission_section(results),
            "Latency is end to end, from arrival to answer. The floor is the least time a decode "
            "step can take: the bytes it must read over the measured bandwidth. *sat*: while the "
            "closed loop was saturated; for the engine's windowed loops (c, d, quantized) its "
            "steady window, from the answer that ends the initial fill to the last arrival; "
            "elsewhere the whole run (full batches throughout).",
            "",
        ]
    )


def console(results: dict) -> str:
    """The tables as printed at the end of a run."""
    admission = admission_rows(results)
    return "\n".join(
        [
            *facts(results),
            "",
            text_table(TARGET_HEADER, target_rows(results)),
            "",
            text_table(MODE_HEADER, mode_rows(results)),
            "",
            text_table(RATE_HEADER, rate_rows(results)),
            *(["", text_table(ADMISSION_HEADER, admission)] if admission else []),
        ]
    )


def _admission_section(results: dict) -> list[str]:
    rows = admission_rows(results)
    if not rows:
        return []
    return ["## Admission per request (engine runs)", "", md_table(ADMISSION_HEADER, rows), ""]


def merge(paths: Sequence[Path]) -> dict:
    """Merge results of one card: the first file's facts, every file's modes (later win)."""
    merged: dict = json.loads(paths[0].read_text())
    for path in paths[1:]:
        other = json.loads(path.read_text())
        merged.setdefault("modes", {}).update(other.get("modes", {}))
        merged.setdefault("merged_from", []).append(str(path))
    add_ratios(merged)
    return merged


def compare(paths: Sequence[Path]) -> str:
    """A Markdown table of each run's headline, side by side: per mode, the saturated tok/s
    and its ratios over (a) and (b), one column group per run (named by its length scale)."""
    runs = [json.loads(path.read_text()) for path in paths]
    header = ["mode"]
    for path, results in zip(paths, runs, strict=True):
        scale = (results.get("workload") or {}).get("length_scale")
        name = f"x{scale:g} lengths" if isinstance(scale, (int, float)) else path.stem
        header += [f"sat tok/s ({name})", f"vs (a) ({name})", f"vs (b) ({name})"]
    rows = []
    for key in MODE_ORDER:
        if not any(key in results.get("modes", {}) for results in runs):
            continue
        row = [MODE_LABELS.get(key, key)]
        for results in runs:
            mode = results.get("modes", {}).get(key) or {}
            sat = saturated(headline(mode) or {})
            ratios = mode.get("ratios") or {}
            row += [
                _f(sat.get("output_tokens_per_s")),
                _f(ratios.get("output_tokens_per_s_vs_a"), "{:.2f}x"),
                _f(ratios.get("output_tokens_per_s_vs_b"), "{:.2f}x"),
            ]
        rows.append(row)
    return md_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``md RESULTS.json``, ``merge OUT.json IN.json...`` or ``compare IN.json...``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "md":
        path = Path(argv[1])
        results = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(results))
        print(path.with_suffix(".md"))
        return 0
    if len(argv) >= 3 and argv[0] == "merge":
        out = Path(argv[1])
        results = merge([Path(p) for p in argv[2:]])
        write_json(results, out)
        out.with_suffix(".md").write_text(markdown(results))
        print(out, out.with_suffix(".md"))
        return 0
    if len(argv) >= 2 and argv[0] == "compare":
        print(compare([Path(p) for p in argv[1:]]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
