"""What ``vlmq top`` and ``vlmq report`` make of worker events (plain dicts, no broker)."""

import json
from pathlib import Path

from PIL import Image

from producer.cli import main
from producer.cluster import ClusterState
from producer.report import load_events, plot, summary, timelines
from producer.top import render

T0 = 1_800_000_000.0
GIB = 1024**3


def gpu_event(t: float, host: str = "vlmq-gpu0@a", **fields) -> dict:
    return {"type": "worker-gpu", "hostname": host, "timestamp": t, "local_received": t, **fields}


def batch_event(t: float, host: str = "vlmq-gpu0@a", **fields) -> dict:
    return {"type": "worker-batch", "hostname": host, "timestamp": t, "local_received": t,
            **fields}  # fmt: skip


def totals(steps: int, rows: float, tasks: int, tokens: int) -> dict:
    return {"model_steps_total": steps, "batch_rows_total": rows, "tasks_total": tasks,
            "tasks_failed_total": 0, "answer_tokens_total": tokens}  # fmt: skip


def busy_run() -> list[dict]:
    """Twelve seconds of a busy GPU worker; batches of 8 every second; a CPU worker idle."""
    events = []
    for i in range(13):
        t = T0 + i
        gpu = {"gpu_name": "NVIDIA H100", "gpu_util": 90.0, "gpu_mem_used": 60 * GIB,
               "gpu_mem_total": 80 * GIB, "gpu_power_w": 410.0, "gpu_temp_c": 63}  # fmt: skip
        events.append(gpu_event(t, queue_depth=40 - i, queue_buffered=16,
                                **gpu, **totals(i, 8 * i, 8 * i, 800 * i)))  # fmt: skip
        events.append(batch_event(t + 0.5, batch_size=8, batch_steps=1, batch_finished=8,
                                  queue_wait_ms=45.0, queue_buffered=8))  # fmt: skip
        events.append(gpu_event(t, host="cpu@b", queue_buffered=0, **totals(0, 0, 0, 0)))
    return events


def test_state_shows_gpu_batches_queue_and_rates_over_the_window():
    state = ClusterState(window_s=10.0)
    for event in busy_run():
        state.apply(event)
    state.apply({"type": "task-succeeded", "hostname": "vlmq-gpu0@a", "uuid": "x"})  # ignored
    cpu, gpu = state.rows(now=T0 + 13)
    assert (gpu.hostname, gpu.online, gpu.gpu_name) == ("vlmq-gpu0@a", True, "NVIDIA H100")
    assert (gpu.gpu_util, gpu.gpu_mem_used, gpu.gpu_temp_c) == (90.0, 60 * GIB, 63)
    assert (gpu.queue_depth, gpu.queue_buffered) == (28, 8)  # buffered: the last batch's
    assert (gpu.last_batch_size, gpu.mean_batch_size, gpu.queue_wait_ms) == (8, 8.0, 45.0)
    assert gpu.tasks_total == 96
    assert gpu.tasks_per_s == 8.0 and gpu.tokens_per_s == 800.0
    assert cpu.online and cpu.gpu_util is None and cpu.gpu_mem_used is None
    assert cpu.tasks_per_s == 0.0 and cpu.mean_batch_size is None


def test_workers_go_offline_on_offline_event_or_silence():
    state = ClusterState(offline_after_s=10.0)
    state.apply(gpu_event(T0, **totals(1, 4, 4, 40)))
    state.apply(gpu_event(T0, host="gone@c"))
    state.apply({"type": "worker-offline", "hostname": "gone@c", "timestamp": T0 + 1})
    gone, alive = state.rows(now=T0 + 2)
    assert alive.online and not gone.online
    assert not state.rows(now=T0 + 30)[1].online
    assert state.rows(now=T0 + 30)[1].tasks_per_s is None
    assert state.rows(now=T0 + 30)[1].mean_batch_size == 4.0  # since the worker started


def test_top_renders_a_row_per_worker_with_dashes_for_unknown_figures():
    state = ClusterState()
    for event in busy_run():
        state.apply(event)
    text = render(state.rows(now=T0 + 13), "redis://host:6379/0", now=T0 + 13)
    header, _, columns, cpu, gpu, gpus = text.splitlines()
    assert "2 of 2 workers online" in header
    assert columns.split()[:3] == ["WORKER", "STATE", "GPU%"]
    assert gpu.split()[:6] == ["vlmq-gpu0@a", "online", "90", "60.0/80.0", "410", "W"]
    assert "8/8.0" in gpu and "800" in gpu
    assert cpu.split()[:6] == ["cpu@b", "online", "-", "-", "-", "-"]
    assert gpus == "GPU: NVIDIA H100"
    assert "no worker has sent events yet" in render([], "redis://x", now=T0)


def test_report_turns_events_into_timelines_a_summary_and_a_png(tmp_path: Path):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([*map(json.dumps, busy_run()), "not json", "[1, 2]"]) + "\n")
    events = load_events(path)
    assert len(events) == 39
    lines = timelines(events)
    gpu = lines["vlmq-gpu0@a"]
    assert gpu.gpu_util.v[:2] == [90.0, 90.0] and gpu.gpu_util.t[:2] == [0.0, 1.0]
    assert gpu.gpu_mem_gib.v[0] == 60.0
    assert gpu.batch_size.t[0] == 0.5 and len(gpu.batch_size.v) == 13
    assert gpu.queue_depth.v[-1] == 28
    assert lines["cpu@b"].gpu_util.v == []
    cpu_line, gpu_line = summary(lines)
    assert "no GPU figures" in cpu_line
    assert "104 tasks, 13 model steps, mean batch 8.0" in gpu_line
    assert "mean GPU 90%" in gpu_line and "max queue 40" in gpu_line
    out = plot(lines, tmp_path / "report.png", "a run")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 600


def test_report_command_needs_events(tmp_path: Path, capsys):
    assert main(["report"]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "worker-heartbeat", "hostname": "a"}) + "\n")
    assert main(["report", str(empty), "-o", str(tmp_path / "r.png")]) == 1
    assert "no worker-gpu or worker-batch events" in capsys.readouterr().err
