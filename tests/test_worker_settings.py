import time

import pytest

from producer.errors import ConfigurationError
from worker.bootstep import refuse_unsupported_pool
from worker.cli import celery_worker_argv
from worker.gpu import pin_gpu
from worker.settings import PRECISIONS, WorkerSettings


def test_defaults_need_only_a_model():
    s = WorkerSettings.from_env({"VLMQ_MODEL": "meta-llama/Llama-3.2-11B-Vision-Instruct"})
    assert (s.precision, s.attn_implementation, s.device) == ("bf16", "sdpa", "cuda")
    assert s.engine == "continuous"
    assert s.max_batch_size == 32
    assert s.max_wait_s == 0.05
    assert s.sweep_interval_s == 30
    assert s.gpu_memory_gib == 0  # no limit


@pytest.mark.parametrize(
    ("engine", "slots", "prefetch"),
    [("continuous", 32, 40), ("continuous", 64, 80), ("continuous", 1, 3), ("batch", 32, 64)],
)
def test_prefetch_is_sized_from_the_slots(engine: str, slots: int, prefetch: int) -> None:
    s = WorkerSettings.from_env(
        {"VLMQ_MODEL": "m", "VLMQ_ENGINE": engine, "VLMQ_MAX_BATCH_SIZE": str(slots)}
    )
    assert s.prefetch_count == prefetch


def test_values_are_parsed():
    s = WorkerSettings.from_env(
        {
            "VLMQ_MODEL": "/models/cot",
            "VLMQ_PRECISION": "NF4",
            "VLMQ_MAX_BATCH_SIZE": "8",
            "VLMQ_MAX_WAIT_MS": "0",
            "VLMQ_WARMUP": "0",
            "VLMQ_SWEEP_INTERVAL_S": "0",
            "VLMQ_GPU_MEMORY_GIB": "24",
        }
    )
    assert (s.precision, s.max_batch_size, s.max_wait_ms, s.warmup) == ("nf4", 8, 0, False)
    assert s.gpu_memory_gib == 24
    assert s.sweep_interval_s == 0  # no sweeper


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"VLMQ_PRECISION": "fp4"}, "VLMQ_PRECISION"),
        ({"VLMQ_ATTN": "flash"}, "VLMQ_ATTN"),
        ({"VLMQ_DEVICE": "tpu"}, "VLMQ_DEVICE"),
        ({"VLMQ_ENGINE": "vllm"}, "VLMQ_ENGINE"),
        ({"VLMQ_MAX_BATCH_SIZE": "lots"}, "integer in 1..1024"),
        ({"VLMQ_MAX_BATCH_SIZE": "0"}, "VLMQ_MAX_BATCH_SIZE"),
        ({"VLMQ_MAX_WAIT_MS": "-5"}, "integer in 0..60000"),
        ({"VLMQ_WARMUP": "maybe"}, "VLMQ_WARMUP"),
        ({"VLMQ_SWEEP_INTERVAL_S": "-1"}, "VLMQ_SWEEP_INTERVAL_S"),
        ({"VLMQ_GPU_MEMORY_GIB": "24GiB"}, "VLMQ_GPU_MEMORY_GIB=0"),
        ({"VLMQ_PRECISION": "nf4", "VLMQ_DEVICE": "cpu"}, "bitsandbytes"),
    ],
)
def test_bad_settings_say_how_to_fix_them(env, needle):
    with pytest.raises(ConfigurationError, match=needle):
        WorkerSettings.from_env({"VLMQ_MODEL": "/m", **env})


@pytest.mark.parametrize("value", ["int8", "INT8", " int8 "])
def test_int8_is_refused_as_removed_naming_what_to_use(value):
    with pytest.raises(ConfigurationError) as refused:
        WorkerSettings.from_env({"VLMQ_MODEL": "/m", "VLMQ_PRECISION": value})
    message = str(refused.value)
    assert message.startswith("VLMQ_PRECISION=int8 was removed: ")
    assert "25x slower than bf16 on an H200" in message
    assert "Use bf16, or nf4 for a smaller memory footprint" in message
    assert "int8" not in PRECISIONS


def test_missing_model_says_what_to_set():
    with pytest.raises(ConfigurationError, match="VLMQ_MODEL is not set"):
        WorkerSettings.from_env({})


def test_pools_that_cannot_hold_the_model_are_refused_with_the_flag_to_use():
    from celery.concurrency.prefork import TaskPool
    from celery.concurrency.solo import TaskPool as SoloPool
    from celery.concurrency.thread import TaskPool as ThreadPool

    with pytest.raises(ConfigurationError, match=r"prefork pool .*--pool=solo"):
        refuse_unsupported_pool(TaskPool, [])
    # Celery swaps an explicit --pool=prefork for the configured solo: the flag still counts.
    for argv in (["--pool=prefork"], ["--pool", "gevent"], ["-P", "eventlet"], ["-Pprocesses"]):
        with pytest.raises(ConfigurationError, match="--pool=threads"):
            refuse_unsupported_pool(SoloPool, ["worker", *argv])
    refuse_unsupported_pool(SoloPool, ["worker", "--pool=solo"])
    refuse_unsupported_pool(ThreadPool, ["worker", "--pool=solo", "-P", "threads"])
    refuse_unsupported_pool(SoloPool, [])


def test_pin_gpu_sets_visible_devices():
    env = {"VLMQ_GPU": "3"}
    assert pin_gpu(env) == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert pin_gpu({}) is None


def test_worker_command_line():
    argv = celery_worker_argv(1, "info", ["--without-mingle"])
    assert argv[1:6] == ["-m", "celery", "-A", "worker.app", "worker"]
    assert "--pool=solo" in argv and "vlmq-gpu1@%h" in argv and argv[-1] == "--without-mingle"


def test_served_model_id_names_model_and_precision():
    s = WorkerSettings.from_env({"VLMQ_MODEL": "/srv/models/Llama-3.2V-11B-cot/"})
    assert s.served_model == "llama-3.2v-11b-cot.bf16"
    s = WorkerSettings.from_env(
        {"VLMQ_MODEL": "meta-llama/Llama-3.2-11B-Vision-Instruct", "VLMQ_PRECISION": "nf4"}
    )
    assert s.served_model == "llama-3.2-11b-vision-instruct.nf4"


def test_batch_timing_takes_the_fastest_runs_and_says_what_it_measured():
    """Load from elsewhere only adds time: a slow run among fast ones does not count."""
    from types import SimpleNamespace

    from worker.factory import TIMING_RUNS, TIMING_TOKENS, time_full_batch

    delays = iter([0.0, 0.20, 0.30, 0.01, 0.03, 0.01, 0.60])  # warm-up, then (prefill, long)s

    def generate(batch):
        time.sleep(next(delays))
        return [SimpleNamespace(answer_tokens=r.max_new_tokens) for r in batch]

    timing = time_full_batch(generate, rows=2)
    assert len(timing.runs_s) == TIMING_RUNS
    assert 0.01 <= timing.prefill_s < 0.1
    assert timing.step_s < (0.03 - 0.005) / (TIMING_TOKENS - 1) * 2
    assert "fastest of 3 runs" in timing.describe()
