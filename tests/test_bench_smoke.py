"""The benchmark harness (``python -m bench``) must not rot: its CPU smoke mode runs every
mode on the tiny model, the whole system through a real Redis and Celery worker included."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH_REDIS_URL = os.environ.get("VLMQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.mark.integration
def test_smoke_run_answers_every_request_in_every_mode(tmp_path: Path) -> None:
    import redis

    try:
        redis.Redis.from_url(BENCH_REDIS_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis answers at {BENCH_REDIS_URL}; start one (`make redis`)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
            "--redis-url",
            BENCH_REDIS_URL,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("a", "b", "c", "d"):
        mode = results["modes"][key]
        assert mode["status"] == "ok", (key, mode.get("error"), mode.get("reason"))
        assert mode["probe"]["step_ms"] is not None, key
        assert mode["summaries"], key
        for summary in mode["summaries"]:
            assert summary["n_planned"] > 0, (key, summary["name"])
            assert summary["n_ok"] == summary["n_done"] == summary["n_planned"], (key, summary)
            assert summary["n_failed"] == summary["n_short"] == 0, (key, summary)
        for run in mode["runs"]:
            for record in run["records"]:
                assert record["error"] is None, (key, record)
                assert record["answer_tokens"] == record["expected_tokens"], (key, record)
    assert {run["schedule"] for run in results["modes"]["c"]["runs"]} == {"closed", "poisson"}
    assert {run["schedule"] for run in results["modes"]["d"]["runs"]} == {"closed", "poisson"}
    assert results["modes"]["d"]["worker"]["ready_s"] > 0
    assert results["modes"]["nf4"]["status"] == results["modes"]["int8"]["status"] == "skipped"
    assert "(d) producer -> Redis -> Celery worker" in (tmp_path / "smoke.md").read_text()


def test_full_size_architecture_tokenizer_and_tiles() -> None:
    import torch
    from PIL import Image

    from bench import model_factory as mf
    from bench.workload import Workload

    config = mf.build_config("11b")
    with torch.device("meta"):
        model = mf.MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert mf.count_parameters(model) == 10_670_220_835
    assert model.lm_head.out_features == config.image_token_index == 128256
    assert mf.forced_length_generation_config(config).eos_token_id == [128256]

    processor = mf.build_processor(560)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<|image|>", "<|begin_of_text|>"]) == [128256, 128000]
    workload = Workload(tile_size=560)
    specs = [next(s for s in workload.requests(50) if s.tiles == t) for t in (1, 2, 3, 4)]
    images = [[Image.open(io.BytesIO(workload.image_bytes(s))).convert("RGB")] for s in specs]
    inputs = processor.image_processor(images, return_tensors="pt")
    assert inputs["aspect_ratio_mask"].sum(dim=-1).flatten().tolist() == [1, 2, 3, 4]
