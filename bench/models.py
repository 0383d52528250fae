"""The in-process model: built (random weights) or loaded, saved for ``from_pretrained``,
freed; the batch size that fits; the worker's executor on it with the slots that fit."""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import model_factory as mf
from bench.drive import serve_now
from bench.progress import log
from bench.state import Bench
from bench.targets import Target, generate_target, worker_target
from worker.engine.parts import MllamaParts
from worker.engine.slots import plan_capacity
from worker.factory import PROMPT_TOKENS
from worker.model.loading import load_model


def load_inprocess_model(bench: Bench) -> None:
    a = bench.args
    info: dict[str, Any] = {"kind": a.model}
    with bench.phase("model"):
        t0 = time.perf_counter()
        if a.model == "tiny":
            bench.tmp_dir = tempfile.TemporaryDirectory(prefix="vlmq-bench-tiny-")
            bench.model_dir = mf.prepare_tiny(Path(bench.tmp_dir.name))
            bench.model, bench.processor = load_model(
                str(bench.model_dir), precision="fp32", device=a.device
            )
            info["saved"] = True
        else:
            config = mf.build_config(a.model)
            log(f"building {a.model} with random weights on {a.device}: {mf.describe(config)}")
            dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
            bench.model = mf.build_random_model(config, device=a.device, dtype=dtype, seed=a.seed)
            bench.processor = mf.build_processor(mf.TILE_SIZES[a.model])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
        info["build_s"] = time.perf_counter() - t0
        wb = mf.weight_bytes(bench.model)
        info.update(
            parameters=mf.count_parameters(bench.model),
            weight_bytes=wb["total"],
            decode_weight_bytes=wb["decode"],
            dtype=str(next(bench.model.parameters()).dtype),
            cache=mf.cache_bytes(bench.model.config, 2 if a.device.startswith("cuda") else 4),
            architecture=mf.describe(bench.model.config),
        )
        mf.log_model(bench.model, f"model built in {info['build_s']:.1f} s")
    bench.results["model"] = info
    bench.save()


def save_model_for_loading(bench: Bench) -> None:
    if bench.model_dir is None:
        bench.tmp_dir = tempfile.TemporaryDirectory(prefix="vlmq-bench-")
        bench.model_dir = Path(bench.tmp_dir.name)
    if mf.saved_kind(bench.model_dir) == bench.args.model:
        log(f"reusing the {bench.args.model} model already saved in {bench.model_dir}")
        info = bench.results.setdefault("model", {"kind": bench.args.model})
        info.update(save_s=None, reused_dir=str(bench.model_dir))
        if "cache" not in info:
            info.update(mf.describe_saved(bench.model_dir))
        return
    if bench.model is None:
        load_inprocess_model(bench)
    with bench.phase("save"):
        log(f"saving the model to {bench.model_dir} (for from_pretrained)")
        seconds = mf.save_bench_model(
            bench.model, bench.processor, bench.model_dir, bench.args.model
        )
        size = sum(f.stat().st_size for f in bench.model_dir.iterdir() if f.is_file())
        log(f"saved {size / 1e9:.1f} GB in {seconds:.1f} s ({size / seconds / 1e9:.2f} GB/s)")
        bench.results["model"].update(save_s=seconds, saved_bytes=size, dir=str(bench.model_dir))
    bench.save()


def free_model(bench: Bench) -> None:
    bench.model = None
    bench.processor = None
    bench.release_memory()
    if torch.cuda.is_available():
        log(f"model freed; {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated")


def fit_batch(bench: Bench) -> dict:
    """The largest batch (power of two up to the cap) whose worst case fits in memory,
    with its prefill and step times, timed warm (the batch's first run, which pays the new
    shape's one-time costs, is reported apart as ``cold_first_token_s``)."""
    a = bench.args
    cache = bench.results["model"]["cache"]
    total = torch.cuda.get_device_properties(0).total_memory
    longest = max(s.answer_tokens for s in bench.workload.requests(200))
    data = bench.image_of(bench.probe_spec)
    k = 8
    tried = []
    b = 1 << (max(1, a.max_batch_cap).bit_length() - 1)
    while b >= 1:
        target = generate_target(bench.model, bench.processor, b, f"(b) fit {b}")
        bench.reset_peak()
        entry: dict[str, Any] = {"batch": b}
        try:
            times = []
            for tokens in (1, 1, 1 + k):
                spec = dataclasses.replace(bench.probe_spec, answer_tokens=tokens)
                t = time.perf_counter()
                outcomes = serve_now(target, [(spec, data)] * b)
                times.append(time.perf_counter() - t)
                errors = [o.error for o in outcomes if o.error is not None]
                if errors:  # the executor turns an OOM into every request's error
                    raise RuntimeError(str(errors[0]))
            peak = torch.cuda.max_memory_reserved()
            growth = b * cache["self_per_token"] * (longest + 64)
            entry.update(
                cold_first_token_s=times[0],
                first_token_s=times[1],
                step_ms=(times[2] - times[1]) / k * 1000.0,
                peak_reserved=peak,
                need=peak + growth,
                fits=peak + growth <= 0.92 * total,
            )
        except Exception as exc:  # OOM, or a cuBLAS/cuDNN allocation failure
            entry.update(fits=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
        tried.append(entry)
        gc.collect()
        torch.cuda.empty_cache()
        log(f"b: batch {b}: " + ("fits" if entry["fits"] else "does not fit") + (
            f", first token {entry['first_token_s']:.2f} s, {entry['step_ms']:.1f} ms/step, "
            f"need {entry['need'] / 2**30:.1f} GiB" if "need" in entry else ""))  # fmt: skip
        if entry["fits"]:
            return {"batch": b, "tried": tried, **entry}
        b //= 2
    raise RuntimeError("not even a batch of 1 fits in GPU memory")


def ensure_batch(bench: Bench) -> int:
    """The batch size of b and cb, and the engine slots of c, d and the quantized modes:
    ``--max-batch``, else the largest that fits (found once, on the in-process model),
    else 16 (4 on a CPU)."""
    if bench.max_batch is None:
        if bench.args.device.startswith("cuda") and bench.model is not None:
            bench.results["batch_fit"] = fit_batch(bench)
            bench.max_batch = bench.results["batch_fit"]["batch"]
        else:
            bench.max_batch = 16 if bench.args.device.startswith("cuda") else 4
        bench.save()
    return bench.max_batch


def slots_that_fit(bench: Bench, model: Any) -> int:
    """The slots the engine's planner would choose by itself for the workload's lengths (and
    the bench's memory cap, as the worker's factory passes it)."""
    parts = MllamaParts(model)
    try:
        capacity = plan_capacity(
            parts.geometry,
            model.config.vision_config,
            parts.dtype,
            parts.device,
            max_slots=None,
            max_seq_len=bench.limits.max_new_tokens + PROMPT_TOKENS,
            memory_fraction=0.9,
            memory_limit=bench.args.gpu_memory_gib * 2**30 or None,
        )
    except ValueError:
        return 0
    return capacity.max_slots


def fitting_worker_target(
    bench: Bench, model: Any, processor: Any, slots: int, label: str, precision: str | None = None
) -> Target:
    """The worker's default executor over ``model`` with ``slots`` engine slots, or with as
    many as the engine's memory planner fits when fewer do (``info["slots_asked"]``)."""
    try:
        return worker_target(model, processor, bench.settings(slots, precision), label)
    except ValueError as exc:
        fit = slots_that_fit(bench, model)
        if not 0 < fit < slots:
            raise
        log(f"{label}: {exc}; the engine's planner fits {fit} slots: using them")
    target = worker_target(model, processor, bench.settings(fit, precision), label)
    target.info["slots_asked"] = slots
    return target
