"""``vlmq report``: PNG plots of GPU utilisation, batch size and queue depth over a run.

The input is the workers' events: a JSON-lines file written by ``vlmq top --record`` or
``vlmq report --listen S --save FILE``, or events captured live with ``--listen``.
Plotting needs matplotlib (the ``monitor`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.config import Settings, make_celery_app
from producer.errors import ConfigurationError
from producer.events import BATCH_EVENT, GPU_EVENT

GIB = 1024**3


@dataclass
class Series:
    """Points of one figure over time (seconds since the run's first event)."""

    t: list[float] = field(default_factory=list)
    v: list[float] = field(default_factory=list)

    def add(self, t: float, value: float | None) -> None:
        if value is not None:
            self.t.append(t)
            self.v.append(float(value))


@dataclass
class Timeline:
    """What one worker's events say over the run."""

    gpu_util: Series = field(default_factory=Series)
    gpu_mem_gib: Series = field(default_factory=Series)
    batch_size: Series = field(default_factory=Series)
    queue_depth: Series = field(default_factory=Series)
    queue_buffered: Series = field(default_factory=Series)
    reports: int = 0
    steps: int = 0
    rows: float = 0.0  # requests computed per step, summed over steps
    tasks: int = 0  # requests that ended


def load_events(path: Path) -> list[dict[str, Any]]:
    """The events of a JSON-lines file; lines that are not JSON objects are skipped."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def timelines(events: Iterable[Mapping[str, Any]]) -> dict[str, Timeline]:
    """One :class:`Timeline` per worker host name, from ``worker-gpu``/``worker-batch``."""
    ours = [e for e in events if e.get("type") in (GPU_EVENT, BATCH_EVENT) and e.get("hostname")]
    ours.sort(key=lambda e: float(e.get("timestamp") or 0.0))
    if not ours:
        return {}
    t0 = float(ours[0].get("timestamp") or 0.0)
    out: dict[str, Timeline] = {}
    for e in ours:
        line = out.setdefault(e["hostname"], Timeline())
        t = float(e.get("timestamp") or 0.0) - t0
        if e["type"] == BATCH_EVENT:
            line.batch_size.add(t, e.get("batch_size"))
            line.reports += 1
            line.steps += e.get("batch_steps", 1)
            line.rows += e.get("batch_size", 0) * e.get("batch_steps", 1)
            line.tasks += e.get("batch_finished", 0)
            continue
        line.gpu_util.add(t, e.get("gpu_util"))
        mem = e.get("gpu_mem_used")
        line.gpu_mem_gib.add(t, None if mem is None else mem / GIB)
        line.queue_depth.add(t, e.get("queue_depth"))
        line.queue_buffered.add(t, e.get("queue_buffered"))
    return out


def summary(lines: Mapping[str, Timeline]) -> list[str]:
    """One line per worker: span, tasks, batch size, GPU and queue figures."""
    out = []
    for host, line in sorted(lines.items()):
        span = max([*line.gpu_util.t, *line.batch_size.t, *line.queue_depth.t], default=0.0)
        parts = [f"{host}: {span:.0f} s", f"{line.tasks} tasks", f"{line.steps} model steps"]
        if line.steps:
            parts.append(f"mean batch {line.rows / line.steps:.1f}, "
                         f"max {max(line.batch_size.v):.0f}")  # fmt: skip
        util = line.gpu_util.v
        parts.append(f"mean GPU {sum(util) / len(util):.0f}%" if util else "no GPU figures")
        if line.queue_depth.v:
            parts.append(f"max queue {max(line.queue_depth.v):.0f}")
        out.append(", ".join(parts))
    return out


def plot(lines: Mapping[str, Timeline], path: Path, title: str) -> Path:
    """Draw GPU utilisation (and memory), batch sizes and queue depth, one colour a worker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gpu_ax, batch_ax, queue_ax) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    has_mem = any(line.gpu_mem_gib.v for line in lines.values())
    mem_ax = gpu_ax.twinx() if has_mem else None
    for i, (host, line) in enumerate(sorted(lines.items())):
        color = f"C{i % 10}"
        gpu_ax.plot(line.gpu_util.t, line.gpu_util.v, color=color, label=host)
        if mem_ax is not None:
            mem_ax.plot(line.gpu_mem_gib.t, line.gpu_mem_gib.v, color=color, ls=":", alpha=0.7)
        batch_ax.plot(line.batch_size.t, line.batch_size.v, "o", ms=4, color=color, label=host)
        queue_ax.step(line.queue_depth.t, line.queue_depth.v, where="post", color=color,
                      label=f"{host} broker")  # fmt: skip
        queue_ax.step(line.queue_buffered.t, line.queue_buffered.v, where="post", color=color,
                      ls="--", label=f"{host} buffered")  # fmt: skip
    if not any(line.gpu_util.v for line in lines.values()):
        gpu_ax.text(0.5, 0.5, "no GPU figures (CPU worker, or NVML unavailable)",
                    ha="center", va="center", transform=gpu_ax.transAxes, color="0.4")  # fmt: skip
    gpu_ax.set_ylim(0, 105)
    gpu_ax.set_ylabel("GPU utilisation, %")
    if mem_ax is not None:
        mem_ax.set_ylabel("memory used, GiB (dotted)")
        top = max(max(line.gpu_mem_gib.v, default=0.0) for line in lines.values())
        mem_ax.set_ylim(0, top * 1.25)  # headroom: the line stays clear of the frame
    batch_ax.set_ylabel("batch size")
    batch_ax.set_ylim(bottom=0)
    queue_ax.set_ylabel("queue depth")
    queue_ax.set_ylim(bottom=0)
    queue_ax.set_xlabel("seconds since the first event")
    for ax in (gpu_ax, batch_ax, queue_ax):
        ax.grid(True, alpha=0.3)
    for ax in (batch_ax, queue_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_command(args: argparse.Namespace) -> int:
    """Run ``vlmq report``: 0 with a plot written, 1 without events, 2 on a usage error."""
    if (args.events is None) == (args.listen is None):
        print("vlmq report: give an EVENTS file or --listen SECONDS", file=sys.stderr)
        return 2
    if args.events is not None:
        events = load_events(args.events)
        source = str(args.events)
    else:
        try:
            events = _listen(args.listen, args.save)
        except (ConfigurationError, RuntimeError) as exc:
            print(f"vlmq: {exc}", file=sys.stderr)
            return 1
        source = f"{args.listen:g} s of live events"
    lines = timelines(events)
    if not lines:
        print(f"vlmq report: no worker-gpu or worker-batch events in {source}", file=sys.stderr)
        return 1
    started = min(float(e.get("timestamp") or 0.0) for e in events)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    plot(lines, args.output, f"vlmq — {', '.join(sorted(lines))} — from {stamp}")
    for text in summary(lines):
        print(text)
    print(f"wrote {args.output}")
    return 0


def _listen(seconds: float, save: Path | None) -> list[dict[str, Any]]:
    from producer.listener import EventListener, Recorder

    app = make_celery_app(Settings.from_env())
    events: list[dict[str, Any]] = []
    recorder = Recorder(save) if save else None

    def keep(event: dict[str, Any]) -> None:
        events.append(event)
        if recorder is not None:
            recorder.write(event)

    listener = EventListener(app, keep).start()
    try:
        if listener.error is None:
            time.sleep(seconds)
    finally:
        listener.stop()
        if recorder is not None:
            recorder.close()
    if listener.error is not None:
        raise RuntimeError(f"cannot read worker events: {listener.error}")
    return list(events)
