"""``vlmq top``: a live view of the workers — GPU, batches, queue, throughput — from events.

It listens to the workers' ``worker-*`` events on the broker (no worker connection, no
torch), so it runs anywhere the producer does.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from producer.cluster import ClusterState, WorkerRow
from producer.config import Settings, make_celery_app
from producer.errors import ConfigurationError
from producer.listener import EventListener, Recorder

GIB = 1024**3
COLUMNS = ("WORKER", "STATE", "GPU%", "MEM GiB", "POWER", "TEMP", "QUEUED", "BUFFER",
           "BATCH last/avg", "WAIT ms", "TASKS", "TASKS/s", "TOK/s")  # fmt: skip


class Watch:
    """Listens to the workers' events and keeps a :class:`ClusterState` of them."""

    def __init__(self, app: Any, recorder: Recorder | None = None) -> None:
        self._state = ClusterState()
        self._lock = threading.Lock()
        self._recorder = recorder
        self.listener = EventListener(app, self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if self._recorder is not None:
            self._recorder.write(event)
        with self._lock:
            self._state.apply(event)

    def rows(self) -> list[WorkerRow]:
        with self._lock:
            return self._state.rows(time.time())


def top_command(args: argparse.Namespace) -> int:
    """Run ``vlmq top``; 0 on success, 1 when no worker was seen (``--once``) or Redis fails."""
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        print(f"vlmq: {exc}", file=sys.stderr)
        return 2
    recorder = Recorder(args.record) if args.record else None
    watch = Watch(make_celery_app(settings), recorder)
    watch.listener.start()
    try:
        return _show(args, watch, settings.redacted_url)
    except KeyboardInterrupt:
        return 0
    finally:
        watch.listener.stop()
        if recorder is not None:
            recorder.close()


def _show(args: argparse.Namespace, watch: Watch, source: str) -> int:
    if watch.listener.error is not None:
        print(f"vlmq: cannot read events from {source}: {watch.listener.error}", file=sys.stderr)
        return 1
    if args.once:
        time.sleep(args.listen)
        rows = watch.rows()
        if not rows:
            print(f"vlmq: no worker events from {source} in {args.listen:g} s", file=sys.stderr)
            return 1
        print(render(rows, source))
        return 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    while watch.listener.error is None:
        print(clear + render(watch.rows(), source), end="\n" if clear else "\n\n", flush=True)
        time.sleep(args.interval)
    print(f"vlmq: lost the events of {source}: {watch.listener.error}", file=sys.stderr)
    return 1


def render(rows: Sequence[WorkerRow], source: str, now: float | None = None) -> str:
    """The table ``vlmq top`` prints: a header line, then one line per worker."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    online = sum(r.online for r in rows)
    header = f"vlmq top — {source} — {stamp} — {online} of {len(rows)} workers online"
    table = [COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [_line(cells, widths) for cells in table]
    if not rows:
        lines.append("(no worker has sent events yet)")
    gpus = {r.gpu_name for r in rows if r.gpu_name}
    if gpus:
        lines.append("GPU: " + ", ".join(sorted(gpus)))
    return "\n".join([header, "", *lines])


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    # Names and states read left to right; figures line up on the right.
    return "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def _cells(r: WorkerRow) -> tuple[str, ...]:
    mem = "-"
    if r.gpu_mem_used is not None and r.gpu_mem_total:
        mem = f"{r.gpu_mem_used / GIB:.1f}/{r.gpu_mem_total / GIB:.1f}"
    failed = f" ({r.tasks_failed_total} failed)" if r.tasks_failed_total else ""
    return (
        r.hostname,
        "online" if r.online else "offline",
        _num(r.gpu_util, "{:.0f}"),
        mem,
        _num(r.gpu_power_w, "{:.0f} W"),
        _num(r.gpu_temp_c, "{:.0f} C"),
        _num(r.queue_depth, "{}"),
        _num(r.queue_buffered, "{}"),
        f"{_num(r.last_batch_size, '{:.3g}')}/{_num(r.mean_batch_size, '{:.1f}')}",
        _num(r.queue_wait_ms, "{:.0f}"),
        _num(r.tasks_total, "{}") + failed,
        _num(r.tasks_per_s, "{:.1f}"),
        _num(r.tokens_per_s, "{:.0f}"),
    )


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
