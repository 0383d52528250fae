"""The worker side of monitoring: event fields, the outbox, metrics, NVML and the sampler.

Plain objects stand in for Celery's loop and dispatcher; Redis is the real test database.
"""

import json
import logging
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import yaml
from celery.events.state import Worker
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from producer.claimcheck import MemoryImageStore
from producer.deadletter import DeadLetters
from producer.errors import ConfigurationError
from producer.events import (
    BATCH_FIELDS,
    GPU_FIELDS,
    BatchStats,
    GpuReading,
    Sample,
    Totals,
    batch_fields,
    sample_fields,
)
from producer.exporter import QueueCollector
from producer.queues import priority_lists
from worker.celery_delivery import shown_result
from worker.handoff import LoopHandoff
from worker.monitoring.backlog import BrokerBacklog
from worker.monitoring.bootstep import MonitoringStep
from worker.monitoring.flower import NO_GPU, stats_fields
from worker.monitoring.metrics import WorkerMetrics, serve_metrics
from worker.monitoring.monitor import WorkerMonitor
from worker.monitoring.nvml import GpuProbe, gpu_selector
from worker.monitoring.outbox import EventOutbox
from worker.monitoring.sampler import Sampler
from worker.monitoring.settings import MonitorSettings
from worker.parts import WorkerParts
from worker.quarantine import Quarantine
from worker.settings import WorkerSettings


def batch_report(**changes) -> BatchStats:
    """What the batch executor reports: one batch of 4, one failed."""
    fields = dict(finished_at=time.time(), window_s=0.25, steps=1, batch_size=4.0,
                  slots_in_use=0, finished=4, failed=1, pending=3, queue_wait_ms=12.5,
                  model_ms=250.0, prefill_ms=None, decode_ms=None, prompt_tokens=160,
                  answer_tokens=40)  # fmt: skip
    return BatchStats(**{**fields, **changes})


def engine_report(**changes) -> BatchStats:
    """What the continuous engine reports: a second of 20 decode steps."""
    fields = dict(window_s=1.0, steps=20, batch_size=6.5, slots_in_use=7, finished=3,
                  failed=1, pending=3, prefill_ms=30.0, decode_ms=70.0)  # fmt: skip
    return batch_report(**{**fields, **changes})


class Dispatcher:
    """Records what is sent, like Celery's EventDispatcher; can fail or be slow on demand."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.enabled = True
        self.sent: list[tuple[str, dict]] = []
        self.fail = fail
        self.delay_s = delay_s

    def send(self, type_: str, **fields) -> None:
        time.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("broker gone")
        self.sent.append((type_, fields))


class ManualLoop:
    """A hub whose ``call_soon`` callbacks run only when the test says so."""

    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, fn, *args) -> None:
        self.ready.append((fn, args))

    def run(self) -> None:
        ready, self.ready = self.ready, []
        for fn, args in ready:
            fn(*args)


def attached(dispatcher: Dispatcher | None, maxlen: int = 256) -> tuple[EventOutbox, ManualLoop]:
    loop = ManualLoop()
    outbox = EventOutbox(maxlen=maxlen)
    outbox.attach(LoopHandoff(loop), lambda: dispatcher)
    return outbox, loop


# -- fields -------------------------------------------------------------------


def test_fields_never_shadow_what_celery_keeps_on_a_worker():
    celery_owned = {*Worker._fields, "type", "timestamp", "local_received", "utcoffset", "status"}
    assert not (set(GPU_FIELDS) | set(BATCH_FIELDS)) & celery_owned


def test_batch_fields_of_a_batch_leave_out_what_is_not_reported():
    fields = batch_fields(batch_report())
    assert fields == {
        "batch_size": 4,
        "batch_steps": 1,
        "batch_window_s": 0.25,
        "batch_slots_in_use": 0,
        "batch_finished": 4,
        "batch_failed": 1,
        "queue_buffered": 3,
        "queue_wait_ms": 12.5,
        "batch_model_ms": 250.0,
        "batch_prompt_tokens": 160,
        "batch_answer_tokens": 40,
        "batch_tokens_per_s": 160.0,
    }
    assert "batch_prefill_ms" not in fields and "batch_decode_ms" not in fields
    assert set(fields) <= set(BATCH_FIELDS)


def test_batch_fields_of_an_engine_carry_prefill_decode_and_slots():
    fields = batch_fields(engine_report())
    assert (fields["batch_prefill_ms"], fields["batch_decode_ms"]) == (30.0, 70.0)
    assert (fields["batch_slots_in_use"], fields["batch_steps"]) == (7, 20)
    assert (fields["batch_size"], fields["batch_finished"], fields["batch_window_s"]) == (6.5, 3, 1)
    assert fields["batch_tokens_per_s"] == 40.0


def test_totals_count_steps_rows_and_finished_tasks():
    totals = Totals().add(batch_report()).add(engine_report())
    assert totals == Totals(steps=21, rows=4 + 6.5 * 20, tasks=7, failed=2, prompt_tokens=320,
                            answer_tokens=80)  # fmt: skip


def test_a_sample_without_gpu_sends_no_gpu_fields():
    fields = sample_fields(Sample(GpuReading(), None, 2, Totals(steps=1, rows=4, tasks=4)))
    assert not [key for key in fields if key.startswith("gpu_")]
    assert "queue_depth" not in fields
    assert fields["queue_buffered"] == 2 and fields["tasks_total"] == 4
    assert set(fields) <= set(GPU_FIELDS)


# -- outbox: never blocks, never raises ---------------------------------------


def test_events_wait_for_the_loop_and_one_flush_sends_them_all():
    dispatcher = Dispatcher()
    outbox, loop = attached(dispatcher)
    for i in range(3):
        outbox.put("worker-batch", {"batch_size": i})
    assert dispatcher.sent == [] and len(loop.ready) == 1
    loop.run()
    assert [fields["batch_size"] for _, fields in dispatcher.sent] == [0, 1, 2]
    outbox.put("worker-gpu", {"gpu_util": 50.0})
    loop.run()
    assert dispatcher.sent[-1] == ("worker-gpu", {"gpu_util": 50.0})


def test_a_stalled_loop_keeps_only_the_newest_events():
    dispatcher = Dispatcher()
    outbox, loop = attached(dispatcher, maxlen=5)
    for i in range(100):
        outbox.put("worker-gpu", {"n": i})
    loop.run()
    assert [fields["n"] for _, fields in dispatcher.sent] == [95, 96, 97, 98, 99]


def test_a_failing_or_missing_dispatcher_drops_events_quietly():
    failing = Dispatcher(fail=True)
    outbox, loop = attached(failing)
    outbox.put("worker-gpu", {})
    loop.run()  # must not raise
    disabled = Dispatcher()
    disabled.enabled = False
    for dispatcher in (None, disabled):
        outbox, loop = attached(dispatcher)
        outbox.put("worker-gpu", {})
        loop.run()
    assert disabled.sent == []


def test_a_flush_lost_by_the_loop_is_asked_for_again():
    now = [0.0]
    loop = ManualLoop()
    dispatcher = Dispatcher()
    outbox = EventOutbox(clock=lambda: now[0])
    outbox.attach(LoopHandoff(loop), lambda: dispatcher)
    outbox.put("worker-gpu", {"n": 1})
    loop.ready.clear()  # the loop dropped it
    now[0] = 5.0
    outbox.put("worker-gpu", {"n": 2})
    assert loop.ready == []
    now[0] = 11.0
    outbox.put("worker-gpu", {"n": 3})
    loop.run()
    assert [fields["n"] for _, fields in dispatcher.sent] == [1, 2, 3]


def test_put_survives_a_broken_handoff_and_a_detached_outbox():
    class Broken:
        def call_soon(self, fn, *args):
            raise RuntimeError("loop gone")

    outbox = EventOutbox()
    outbox.put("worker-gpu", {})  # not attached yet: dropped
    outbox.attach(LoopHandoff(Broken()), lambda: Dispatcher())
    outbox.put("worker-gpu", {})
    outbox.put("worker-gpu", {})
    outbox.detach()
    outbox.put("worker-gpu", {})


def test_a_slow_broker_never_slows_the_thread_that_puts():
    dispatcher = Dispatcher(delay_s=0.2)
    flushes: list = []
    hub = type(
        "Hub", (), {"call_soon": lambda self, fn, *args: flushes.append(lambda: fn(*args))}
    )()
    outbox = EventOutbox()
    outbox.attach(LoopHandoff(hub), lambda: dispatcher)
    outbox.put("worker-batch", {"n": 0})
    loop = threading.Thread(target=flushes[0])
    loop.start()  # the loop is now busy sending, 0.2 s an event
    t0 = time.perf_counter()
    for i in range(1, 1001):
        outbox.put("worker-batch", {"n": i})
    assert time.perf_counter() - t0 < 0.1
    loop.join()


def test_without_a_hub_events_are_sent_at_once():
    dispatcher = Dispatcher()
    outbox = EventOutbox()
    outbox.attach(LoopHandoff(None), lambda: dispatcher)
    outbox.put("worker-gpu", {"gpu_util": 1.0})
    assert dispatcher.sent == [("worker-gpu", {"gpu_util": 1.0})]


# -- monitor and metrics ------------------------------------------------------


def scrape(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_report_feeds_totals_histograms_counters_and_an_event():
    dispatcher = Dispatcher()
    outbox, loop = attached(dispatcher)
    monitor = WorkerMonitor(WorkerMetrics({"model": "tiny", "precision": "fp32"}), outbox)
    monitor.on_batch(batch_report())
    monitor.on_batch(engine_report())
    loop.run()
    assert monitor.totals.tasks == 7 and monitor.totals.steps == 21
    assert [t for t, _ in dispatcher.sent] == ["worker-batch", "worker-batch"]
    values = scrape(monitor.metrics)
    assert values[("vlmq_model_info", (("model", "tiny"), ("precision", "fp32")))] == 1
    assert values[("vlmq_batch_size_count", ())] == 2
    assert values[("vlmq_batch_size_sum", ())] == 10.5
    assert values[("vlmq_model_steps_total", ())] == 21
    assert values[("vlmq_batch_rows_total", ())] == 134
    assert values[("vlmq_tasks_total", (("outcome", "succeeded"),))] == 5
    assert values[("vlmq_tasks_total", (("outcome", "failed"),))] == 2
    assert values[("vlmq_tokens_total", (("kind", "answer"),))] == 80
    assert values[("vlmq_model_seconds_total", (("phase", "all"),))] == 0.5
    assert values[("vlmq_model_seconds_total", (("phase", "prefill"),))] == 0.03
    assert values[("vlmq_queue_wait_seconds_count", ())] == 2


def test_gpu_gauges_are_absent_without_a_gpu_and_present_with_one():
    outbox, _ = attached(Dispatcher())
    monitor = WorkerMonitor(WorkerMetrics({}), outbox)
    monitor.on_sample(GpuReading(), None, 0)
    values = scrape(monitor.metrics)
    assert not [name for name, _ in values if name.startswith("vlmq_gpu_")]
    assert values[("vlmq_buffered_requests", ())] == 0
    reading = GpuReading("H100", 87.0, 60 * 2**30, 80 * 2**30, 400.5, 61.0)
    assert monitor.on_sample(reading, 12, 5).queue_depth == 12
    values = scrape(monitor.metrics)
    assert values[("vlmq_gpu_utilization_percent", ())] == 87
    assert values[("vlmq_gpu_memory_used_bytes", ())] == 60 * 2**30
    assert values[("vlmq_gpu_memory_total_bytes", ())] == 80 * 2**30
    assert values[("vlmq_gpu_power_watts", ())] == 400.5
    assert values[("vlmq_gpu_temperature_celsius", ())] == 61


def test_metrics_endpoint_serves_and_a_busy_port_only_turns_it_off(caplog):
    metrics = WorkerMetrics({"model": "tiny"})
    server = serve_metrics(metrics.registry, "127.0.0.1", 0)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert b"vlmq_model_info" in r.read()
        assert serve_metrics(metrics.registry, "127.0.0.1", server.port) is None
        assert "metrics are off" in caplog.text
    finally:
        server.stop()


def test_settings_from_env():
    assert MonitorSettings.from_env({}) == MonitorSettings(9808, "127.0.0.1", 1000)
    custom = MonitorSettings.from_env({"VLMQ_METRICS_PORT": "0", "VLMQ_MONITOR_INTERVAL_MS": "250"})
    assert custom.metrics_port == 0 and custom.interval_s == 0.25
    assert MonitorSettings.from_env({"VLMQ_GPU": "3"}).metrics_port == 9811  # one host, 8 GPUs
    assert MonitorSettings.from_env({"VLMQ_GPU": "GPU-1234"}).metrics_port == 9808
    for bad in ({"VLMQ_METRICS_PORT": "70000"}, {"VLMQ_MONITOR_INTERVAL_MS": "soon"}):
        with pytest.raises(ConfigurationError):
            MonitorSettings.from_env(bad)


def test_a_monitoring_failure_at_start_leaves_the_worker_running(caplog, monkeypatch):
    monkeypatch.setenv("VLMQ_METRICS_PORT", "0")
    settings = WorkerSettings(model="tiny", device="cpu")
    quarantine = Quarantine(DeadLetters(redis.Redis()), app=None)  # never connects here
    app = SimpleNamespace(vlmq=WorkerParts(settings, MemoryImageStore(), quarantine), amqp=None)
    worker = SimpleNamespace(app=app, hub=None, consumer=None)
    step = MonitoringStep(worker)
    assert app.vlmq.observers == [step.monitor.on_batch]
    step.start(worker)  # app.amqp is broken: logged, not raised
    assert "runs without it" in caplog.text
    step.monitor.on_batch(batch_report())
    step.stop(worker)


# -- NVML ---------------------------------------------------------------------


def test_gpu_selector_follows_the_pinned_device():
    assert gpu_selector("cpu", {"CUDA_VISIBLE_DEVICES": "0"}) is None
    assert gpu_selector("cuda", {"CUDA_VISIBLE_DEVICES": "GPU-1234"}) == "GPU-1234"
    assert gpu_selector("cuda", {"CUDA_VISIBLE_DEVICES": "3,1"}) == 3
    assert gpu_selector("cuda", {}) == 0


def test_without_nvml_there_is_no_probe_and_no_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert GpuProbe.open(0) is None
    assert GpuProbe.open(None) is None


def test_figures_a_card_does_not_report_are_none():
    class Nvml:
        NVML_TEMPERATURE_GPU = 0

        def nvmlDeviceGetName(self, h):
            return b"NVIDIA H100 80GB HBM3"

        def nvmlDeviceGetUtilizationRates(self, h):
            return type("Util", (), {"gpu": 93, "memory": 40})()

        def nvmlDeviceGetMemoryInfo(self, h):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

        def nvmlDeviceGetPowerUsage(self, h):
            return 412_345

        def nvmlDeviceGetTemperature(self, h, sensor):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

        def nvmlShutdown(self):
            raise RuntimeError("already shut down")

    probe = GpuProbe(Nvml(), handle=object())
    assert probe.read() == GpuReading("NVIDIA H100 80GB HBM3", 93.0, None, None, 412.345, None)
    probe.close()


# -- sampler and backlog --------------------------------------------------------


def test_sampler_sends_queue_depth_and_absent_gpu_fields(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.lpush("monq", b"a", b"b")
    client.lpush(priority_lists("monq")[5], b"c")
    client.lpush("monq.tiny.fp32", b"d")
    dispatcher = Dispatcher()
    outbox = EventOutbox()
    outbox.attach(LoopHandoff(None), lambda: dispatcher)
    monitor = WorkerMonitor(WorkerMetrics({}), outbox)
    backlog = BrokerBacklog(redis_url, ["monq", "monq.tiny.fp32"])
    sampler = Sampler(monitor, lambda: GpuProbe.open(gpu_selector("cpu")), backlog, 0.05).start()
    deadline = time.monotonic() + 5
    while len(dispatcher.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sampler.stop()
    assert len(dispatcher.sent) >= 2
    event_type, fields = dispatcher.sent[-1]
    assert event_type == "worker-gpu"
    assert fields["queue_depth"] == 4 and fields["queue_buffered"] == 0
    assert not [key for key in fields if key.startswith("gpu_")]


def test_backlog_is_unknown_when_redis_is_not_there():
    assert BrokerBacklog("redis://127.0.0.1:1/0", ["vlmq"]).depth() is None
    assert BrokerBacklog("memory://", ["vlmq"]).depth() is None


# -- the Grafana dashboard and the Prometheus config ------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_dashboard_queries_only_metrics_that_exist(redis_url):
    metrics = WorkerMetrics({"model": "tiny"})
    metrics.observe_sample(Sample(GpuReading("H100", 1.0, 1, 2, 3.0, 4.0), 0, 0, Totals()))
    exporter = CollectorRegistry()
    exporter.register(QueueCollector(redis.Redis.from_url(redis_url), "vlmq"))
    known = {
        sample.name
        for registry in (metrics.registry, exporter)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    } | {"flower_task_runtime_seconds_bucket", "flower_events_total"}  # seen in the live test
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\b((?:vlmq|flower)_\w+)", expr)}
    assert used and used <= known, used - known
    panels = [p["title"] for p in dashboard["panels"]]
    assert {"GPU utilisation", "GPU memory", "Mean batch size", "Queue depth"} <= set(panels)


def test_prometheus_scrapes_workers_exporter_and_flower_and_compose_runs_it():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert "worker-gpu0:9808" in targets["vlmq-worker"]
    assert targets["vlmq-queue"] == ["exporter:9809"] and targets["flower"] == ["flower:5555"]
    compose = yaml.safe_load((DEPLOY.parent / "compose.yaml").read_text())
    services = compose["services"]
    assert any(v.startswith("./deploy/prometheus.yml:")
               for v in services["prometheus"]["volumes"])  # fmt: skip
    assert services["worker-gpu0"]["environment"]["VLMQ_METRICS_ADDR"] == "0.0.0.0"
    assert '--broker="$$REDIS_URL" flower' in " ".join(services["flower"]["command"])


def test_a_failing_loop_callback_does_not_drop_the_others(caplog):
    # kombu's hub ends a round of ready callbacks at the first exception: the others of the
    # round (one may be a call the model thread waits for) would be lost.
    loop = ManualLoop()
    handoff = LoopHandoff(loop)
    ran = []

    def reject() -> None:
        raise ConnectionError("Redis is gone")

    handoff.call(reject)
    handoff.call(ran.append, "ack")
    with caplog.at_level(logging.ERROR):
        loop.run()
    assert ran == ["ack"]
    assert "reject" in caplog.text and "Redis is gone" in caplog.text


# -- Flower: inspect stats ----------------------------------------------------


def test_inspect_stats_carries_the_figures_flower_shows():
    outbox, _ = attached(Dispatcher())
    monitor = WorkerMonitor(WorkerMetrics({}), outbox)
    assert stats_fields("tiny.fp32", "cpu", monitor.row()) == {
        "vlmq_model": "tiny.fp32",
        "vlmq_device": "cpu",
    }
    monitor.on_sample(GpuReading(), 2, 3)
    monitor.on_batch(engine_report())
    cpu = stats_fields("tiny.fp32", "cpu", monitor.row())
    assert cpu["vlmq_gpu"] == NO_GPU
    assert not [key for key in cpu if key.startswith("vlmq_gpu_")]
    assert cpu["vlmq_slots_in_use"] == 7 and cpu["vlmq_batch_size_last"] == 6.5
    assert cpu["vlmq_queue_wait_ms"] == 12.5 and cpu["vlmq_queue_depth"] == 2

    reading = GpuReading("H100", 87.0, 60 * 2**30, 80 * 2**30, 400.5, 61.0)
    monitor.on_sample(reading, 0, 0)
    gpu = stats_fields("tiny.bf16", "cuda", monitor.row())
    assert gpu["vlmq_gpu"] == "H100" and gpu["vlmq_gpu_utilization_percent"] == 87
    assert gpu["vlmq_gpu_memory_used_gib"] == 60 and gpu["vlmq_gpu_memory_total_gib"] == 80
    assert gpu["vlmq_gpu_power_watts"] == 400.5
    # Two samples around a report of 20 steps of 6.5 rows and 40 answer tokens.
    assert gpu["vlmq_batch_size_mean"] == 6.5 and gpu["vlmq_tasks_total"] == 3
    assert gpu["vlmq_tokens_per_second"] > 0
    assert not set(gpu) & set(Worker._fields)


def test_a_task_event_shows_the_figures_before_a_long_answer():
    result = {"answer": "word " * 1000, "stages": None, "prompt_tokens": 17,
              "answer_tokens": 1000, "timings": {"queued_ms": 1.0, "batch_size": 6,
              "gpu_ms": 9.0}, "model": "tiny.fp32"}  # fmt: skip
    shown = shown_result(result)
    assert len(shown) <= 1030
    assert shown.index("'batch_size': 6") < shown.index("'answer'")
    assert "'prompt_tokens': 17" in shown and "'answer_tokens': 1000" in shown
