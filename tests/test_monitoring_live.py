"""Monitoring end to end: a real worker, Flower in headless Chromium, /metrics, top, report.

One worker serves every check, to keep the file well under a minute on two cores.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench import flower_snapshot
from producer.client import Client
from producer.config import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
VLMQ = Path(sys.executable).with_name("vlmq")
TASKS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def wait_for(check, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """Plain Flower (Celery's default settings, its tasks API open as the bench's snapshot
    opens it) on the test Redis; yields its base URL."""
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", f"--broker={redis_url}", "flower",
         "--address=127.0.0.1", f"--port={port}"],
        env={**env(redis_url), "FLOWER_UNAUTHENTICATED_API": "true"},
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def chromium(*args: str) -> str:
    """Run headless Chromium, letting a page's scripts run (Flower's lists load by API)."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("no chromium on PATH: `apt-get install -y chromium` (.ci/run does)")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page(url: str) -> str:
    """The DOM of ``url`` as Chromium renders it."""
    return chromium("--dump-dom", url)


def other_stats(html: str) -> dict[str, str]:
    """The ``vlmq_*`` rows of the "Other" tab of Flower's worker page."""
    return dict(re.findall(r"<td>(vlmq_\w+)</td>\s*<td[^>]*>([^<]*)</td>", html))


def test_flower_metrics_top_and_report_show_a_live_worker(
    start_worker, redis_url: str, flower: str, tmp_path: Path
):
    metrics_port = free_port()
    worker = start_worker(VLMQ_METRICS_PORT=str(metrics_port), VLMQ_MONITOR_INTERVAL_MS="250")
    host = worker.name.replace("%h", socket.gethostname())
    wait_for(lambda: host in get(f"{flower}/workers?json=1"), "Flower to see the worker")

    # Record the run for `vlmq report` while the tasks flow.
    events, png = tmp_path / "events.jsonl", tmp_path / "report.png"
    report = subprocess.Popen(
        [VLMQ, "report", "--listen", "8", "--save", events, "-o", png],
        env=env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(lambda: events.exists() and events.stat().st_size, "vlmq report to record")
    client = Client(Settings.from_env({"REDIS_URL": redis_url}))
    images = [Image.new("RGB", (64, 48), (i * 9, 80, 160)) for i in range(TASKS)]
    handles = [
        client.submit(img, f"What is {i}?", max_new_tokens=2 + i % 4)
        for i, img in enumerate(images)
    ]
    results = [h.result(timeout=60) for h in handles]
    assert max(r.timings.batch_size for r in results) > 1

    # Flower: the worker with its custom event counts, every batched task a SUCCESS.
    def flower_worker():
        (info,) = [w for w in json.loads(get(f"{flower}/workers?json=1"))["data"]
                   if w["hostname"] == host]  # fmt: skip
        # The worker's own events reach the broker in no fixed order with the tasks' events.
        seen = info.get("task-succeeded") == TASKS and info.get("worker-batch", 0) > 0
        return info if seen else None

    info = wait_for(flower_worker, "Flower to see every task succeed and a worker-batch")
    assert info["worker-gpu"] > 0 and info["status"]
    flower_metrics = {
        (s.name, s.labels.get("type"), s.labels.get("worker")): s.value
        for f in text_string_to_metric_families(get(f"{flower}/metrics"))
        for s in f.samples
    }
    assert flower_metrics[("flower_task_runtime_seconds_count", None, host)] == TASKS
    assert flower_metrics[("flower_events_total", "task-succeeded", host)] == TASKS

    tasks_page = page(f"{flower}/tasks")  # newest first, one page
    assert handles[-1].id in tasks_page and host in tasks_page
    assert tasks_page.count("SUCCESS") >= min(TASKS, 10)
    task_page = page(f"{flower}/task/{handles[0].id}")
    assert "SUCCESS" in task_page and "Runtime" in task_page and host in task_page
    # Each task's batch size and token counts, on its page (the event's result).
    assert f"'batch_size': {results[0].timings.batch_size}" in task_page
    assert f"'answer_tokens': {results[0].answer_tokens}" in task_page
    workers_page = page(f"{flower}/workers")
    assert host in workers_page and "Online" in workers_page
    # The worker page's "Other" tab: the figures of `inspect stats`, fetched again on each
    # visit (a visit shows what the one before fetched).
    worker_url = f"{flower}/worker/{host}"
    wait_for(lambda: other_stats(get(worker_url)).get("vlmq_tasks_total") == str(TASKS),
             "Flower's worker page to show every task")  # fmt: skip
    worker_page = page(worker_url)
    assert "vlmq.analyze" in worker_page  # inspect replies reach Flower
    other = other_stats(worker_page)
    assert other["vlmq_gpu"] == "no GPU"  # this machine has none: said, not a crash
    assert not [key for key in other if key.startswith("vlmq_gpu_")]
    assert float(other["vlmq_batch_size_mean"]) > 1
    assert float(other["vlmq_tokens_per_second"]) >= 0
    assert float(other["vlmq_queue_wait_ms"]) >= 0
    assert int(other["vlmq_slots_in_use"]) >= 0
    assert other["vlmq_model"].endswith(".fp32") and other["vlmq_device"] == "cpu"
    shot = tmp_path / "flower.png"
    chromium("--window-size=1280,720", f"--screenshot={shot}", f"{flower}/tasks")
    with Image.open(shot) as img:
        assert img.size == (1280, 720)
    # The bench's snapshot of Flower's pages (README's GPU screenshot), and its rendering.
    saved = tmp_path / "snapshot"
    saved.mkdir()
    flower_snapshot.snapshot(flower, saved, {})
    (page_file,) = saved.glob("worker-*.html")
    assert other_stats(page_file.read_text())["vlmq_tasks_total"] == str(TASKS)
    assert "answer_tokens" in (saved / "task.html").read_text()
    rendered = tmp_path / "worker.png"
    assert flower_snapshot.main(["render", str(page_file), str(rendered)]) == 0
    with Image.open(rendered) as img:
        assert img.size == (1280, 1100)

    # The worker's own /metrics.
    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(get(f"http://127.0.0.1:{metrics_port}/metrics"))
        for s in f.samples
    }
    assert metrics[("vlmq_tasks_total", (("outcome", "succeeded"),))] == TASKS
    assert metrics[("vlmq_tokens_total", (("kind", "answer"),))] == sum(
        r.answer_tokens for r in results
    )
    assert metrics[("vlmq_batch_size_count", ())] >= 1
    assert metrics[("vlmq_batch_rows_total", ())] / metrics[("vlmq_model_steps_total", ())] > 1
    assert metrics[("vlmq_queue_wait_seconds_count", ())] >= 1
    info_labels = dict(next(labels for (name, labels) in metrics if name == "vlmq_model_info"))
    assert info_labels["device"] == "cpu" and info_labels["precision"] == "fp32"
    assert not [name for name, _ in metrics if name.startswith("vlmq_gpu_")]  # no GPU here

    # `vlmq top`, one snapshot.
    top = subprocess.run(
        [VLMQ, "top", "--once", "--listen", "1.5"],
        env=env(redis_url), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert top.returncode == 0, top.stderr
    (row,) = [line for line in top.stdout.splitlines() if line.startswith(host)]
    cells = row.split()
    assert cells[1:3] == ["online", "-"]  # no GPU on this machine: a dash, not a crash
    assert str(TASKS) in cells

    # `vlmq report`: the recorded run as a PNG.
    out, _ = report.communicate(timeout=30)
    assert report.returncode == 0, out
    assert f"{host}: " in out and f"{TASKS} tasks" in out
    with Image.open(png) as img:
        assert img.format == "PNG"
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert {"worker-gpu", "worker-batch"} <= {e["type"] for e in recorded}
