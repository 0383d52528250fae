"""Plots of a results JSON: ``python -m bench.plot RESULTS.json`` (needs matplotlib).

Draws ``<stem>-latency.png`` (throughput against latency across arrival rates, one line per
mode) and ``<stem>-timeline.png`` (GPU utilisation, memory and batch size over the run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.report import MODE_LABELS, MODE_ORDER

COLORS = {"a": "C0", "b": "C1", "c": "C2", "d": "C3", "nf4": "C4", "fp8": "C5", "cb": "C6"}


def plot_all(json_path: Path) -> list[Path]:
    """Draw both plots next to ``json_path``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    results = json.loads(Path(json_path).read_text())
    stem = Path(json_path).with_suffix("")
    return [
        latency_plot(results, Path(f"{stem}-latency.png")),
        timeline_plot(results, Path(f"{stem}-timeline.png")),
    ]


def latency_plot(results: dict, path: Path) -> Path:
    """Output tokens/s against p50 (solid) and p95 (dashed) latency for every run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key in MODE_ORDER:
        summaries = [
            s for s in results.get("modes", {}).get(key, {}).get("summaries", []) if s.get("n_ok")
        ]
        if not summaries:
            continue
        summaries.sort(key=lambda s: s["output_tokens_per_s"])
        x = [s["output_tokens_per_s"] for s in summaries]
        color = COLORS.get(key)
        ax.plot(x, [s["latency_p50_s"] for s in summaries], "o-", color=color,
                label=f"{MODE_LABELS.get(key, key)} p50")  # fmt: skip
        ax.plot(x, [s["latency_p95_s"] for s in summaries], "x--", color=color, alpha=0.6)
        for s in summaries:
            tag = "closed" if s["schedule"] == "closed" else f"{s.get('offered_rate', 0):.2f}/s"
            ax.annotate(tag, (s["output_tokens_per_s"], s["latency_p50_s"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("end-to-end latency, s (solid p50, dashed p95)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(results, "throughput vs latency (arrival rates and closed loop)"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeline_plot(results: dict, path: Path) -> Path:
    """GPU utilisation and memory (NVML) and the batch sizes served, over the whole run."""
    import matplotlib.pyplot as plt

    t0 = results.get("meta", {}).get("started") or 0.0
    timeline = results.get("timeline") or {}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ts = [t - t0 for t in timeline.get("t", [])]
    if ts:
        top.plot(ts, timeline["util"], lw=0.7, color="C0", label="GPU util %")
        mem = top.twinx()
        mem.plot(ts, [m / 2**30 for m in timeline["mem_used"]], lw=0.7, color="C3")
        mem.set_ylabel("memory used, GiB", color="C3")
    else:
        top.text(0.5, 0.5, f"no GPU samples ({timeline.get('source', 'none')})",
                 transform=top.transAxes, ha="center")  # fmt: skip
    top.set_ylabel("GPU utilisation %")
    top.set_ylim(0, 105)
    for phase in results.get("phases", []):
        for ax in (top, bottom):
            ax.axvspan(phase["t0"] - t0, phase["t1"] - t0, alpha=0.06, color="k")
        top.text(phase["t0"] - t0, 100, phase["name"].replace("mode ", ""), fontsize=7,
                 rotation=90, va="top")  # fmt: skip
    for key in MODE_ORDER:
        # One call per mode: the engine's runs have a step every few milliseconds.
        steps = [b for run in results.get("modes", {}).get(key, {}).get("runs", [])
                 for b in run.get("batches", [])]  # fmt: skip
        if steps:
            bottom.hlines([s[2] for s in steps], [s[0] - t0 for s in steps],
                          [s[1] - t0 for s in steps], color=COLORS.get(key), lw=3,
                          label=MODE_LABELS.get(key, key))  # fmt: skip
    bottom.set_ylabel("batch size (engine: rows per step)")
    bottom.set_xlabel("seconds since start")
    bottom.grid(True, alpha=0.3)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(fontsize=7, loc="upper left")
    top.set_title(_title(results, "GPU utilisation, memory and batch size over time"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _title(results: dict, what: str) -> str:
    device = results.get("device", {}).get("name", "?")
    return f"{what}\n{device}, {results.get('meta', {}).get('date', '')}"


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m bench.plot RESULTS.json [...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name in argv:
        for path in plot_all(Path(name)):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
