"""Where a decode step's time goes: kernel counts and times, split-KV attention vs SDPA.

    python -m bench.profile_decode --out $OUT/profile            # the 11B, random weights, CUDA
    python -m bench.profile_decode --model mini --device cpu     # the code path, on a CPU

Builds the engine's decode step as the worker does (compiled pointwise kernels, split-KV
attention on CUDA), then a second decode step over the same weights and caches with attention
as SDPA over masks (what the worker ran before), and for each: the CUDA-graph replay time per
step at several batch sizes (the same run, so their ratio is the gain), and a
``torch.profiler`` table of one eager step's kernels by kind.
Prints Markdown and writes it, with the JSON, under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from bench.bandwidth import decode_floor_ms, measure_copy_bandwidth
from bench.model_factory import (
    build_config,
    build_processor,
    build_random_model,
    cache_bytes,
    weight_bytes,
)
from worker.engine import ContinuousEngine
from worker.engine.decode import DecodeStep
from worker.engine.graphs import DecodeGraphs

KINDS = (
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "splitk")),
    ("attention", ("fmha", "attention", "flash", "efficient")),
    ("fused pointwise (triton)", ("triton",)),
    ("copy / index", ("copy", "index", "scatter", "gather", "cat")),
)


BASELINE = "SDPA attention with masks"


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, marks in KINDS:
        if any(mark in lowered for mark in marks):
            return kind
    return "other pointwise / reduction"


def time_replays(graphs: DecodeGraphs, rows: int, length: int, iters: int) -> float:
    """Milliseconds per replay of the (rows, length) graph (or eager step off CUDA)."""
    for _ in range(5):
        graphs.run(rows, length)
    if graphs.use_graphs:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graphs.run(rows, length)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        graphs.run(rows, length)
    return (time.perf_counter() - t0) * 1000.0 / iters


def kernel_table(run: Callable[[], object]) -> dict:
    """Kernels of one eager call of ``run`` (after one untimed call): count and device time per
    kind, and the heaviest names."""
    run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else 0.0
        kinds[kind_of(event.name)][0] += 1
        kinds[kind_of(event.name)][1] += us
        names[event.name][0] += 1
        names[event.name][1] += us
    top = sorted(names.items(), key=lambda item: -item[1][1])[:12]
    return {
        "kernels": int(sum(count for count, _ in kinds.values())),
        "kernel_ms": sum(us for _, us in kinds.values()) / 1000.0,
        "by_kind": {kind: {"count": int(c), "ms": us / 1000.0} for kind, (c, us) in kinds.items()},
        "top": [{"name": n[:90], "count": int(c), "ms": us / 1000.0} for n, (c, us) in top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="11b", help="11b (default) or mini")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--length", type=int, default=512, help="self-attention span bucket")
    parser.add_argument("--rows", default="1,8,32,64", help="decode batch sizes to time")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",") if int(r) <= args.slots]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    t0 = time.perf_counter()
    model = build_random_model(build_config(args.model), device=args.device, dtype=dtype)
    processor = build_processor(model.config.vision_config.image_size)
    build_s = time.perf_counter() - t0
    # The floor: each step reads the decode weights, and per row a full image's cross K/V and
    # the span's self K/V, at the measured bandwidth.
    bandwidth = measure_copy_bandwidth(args.device)["bytes_per_s"]
    cache = cache_bytes(model.config)
    floors = {
        rows: decode_floor_ms(
            weight_bytes=weight_bytes(model)["decode"],
            batch=rows,
            cross_bytes_per_image=cache["cross_per_image"],
            self_bytes_per_token=cache["self_per_token"],
            context_tokens=args.length,
            bytes_per_s=bandwidth,
        )["floor_ms"]
        for rows in rows_list
    }
    t0 = time.perf_counter()
    # The engine's own graphs are not needed here: DecodeGraphs below captures a few buckets.
    engine = ContinuousEngine(
        model, processor, max_slots=args.slots, max_seq_len=1024, cuda_graphs=False
    )
    ready_s = time.perf_counter() - t0
    use_graphs = engine.device.type == "cuda"
    worker_step = engine._graphs.step  # the worker's own step
    sdpa = DecodeStep(engine.parts, engine.cache, engine._rope, compiled=True, split_kv=False)
    variants = {"worker step": worker_step, BASELINE: sdpa}
    report: dict = {
        "card": torch.cuda.get_device_name() if use_graphs else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "slots": args.slots,
        "length": args.length,
        "model_build_s": build_s,
        "engine_ready_s": ready_s,
        "split_kv": worker_step.split_kv is not None,
        "bandwidth_bytes_per_s": bandwidth,
        "floor_ms": floors,
        "variants": {},
    }
    with torch.inference_mode():
        # Timings of both first, the profiles after: a run cut short keeps the comparison.
        for label, step in variants.items():
            t0 = time.perf_counter()
            graphs = DecodeGraphs(step, rows_list, [args.length], use_graphs=use_graphs)
            graphs.capture()
            report["variants"][label] = {
                "capture_s": time.perf_counter() - t0,
                "step_ms": {r: time_replays(graphs, r, args.length, args.iters) for r in rows_list},
                "eager_step_ms_rows1": time_replays(
                    DecodeGraphs(step, [1], [args.length], use_graphs=False), 1, args.length, 20
                ),
            }
            del graphs
            print(json.dumps({label: report["variants"][label]}), flush=True)
            write(args.out, report, rows_list)
        for label, step in variants.items():
            report["variants"][label]["profile_rows1"] = kernel_table(
                lambda step=step: step(1, args.length)
            )
            report["variants"][label]["profile_rows_max"] = kernel_table(
                lambda step=step: step(rows_list[-1], args.length)
            )
            write(args.out, report, rows_list)

    print(to_markdown(report, rows_list))
    return 0


def write(out: Path | None, report: dict, rows_list: list[int]) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_decode.json").write_text(json.dumps(report, indent=2))
        (out / "profile_decode.md").write_text(to_markdown(report, rows_list))


def to_markdown(report: dict, rows_list: list[int]) -> str:
    variants = report["variants"]
    base = variants.get(BASELINE, {}).get("step_ms")
    lines = [
        f"# Decode step profile: {report['card']}, torch {report['torch']}, "
        f"model {report['model']}, {report['slots']} slots, span {report['length']}",
        "",
        f"Engine built in {report['engine_ready_s']:.1f} s without its graphs (kernel "
        "compilation included); capture of the buckets below: "
        + ", ".join(f"{k} {v['capture_s']:.1f} s" for k, v in variants.items())
        + f". Split-KV attention in the worker's step: {report['split_kv']}.",
        "",
        "| step | " + " | ".join(f"rows {r} ms/step" for r in rows_list) + " |",
        "|---|" + "---|" * len(rows_list),
    ]
    for label, entry in variants.items():
        cells = [
            f"{entry['step_ms'][r]:.2f}"
            + (f" ({entry['step_ms'][r] / base[r]:.2f}x)" if base else "")
            for r in rows_list
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floors = report["floor_ms"]
    lines.append("| floor | " + " | ".join(f"{floors[r]:.2f}" for r in rows_list) + " |")
    worker = variants.get("worker step", {}).get("step_ms")
    if worker:
        ratios = " | ".join(f"{worker[r] / floors[r]:.2f}x" for r in rows_list)
        lines.append(f"| worker step / floor | {ratios} |")
    lines += [
        "",
        f"Floor: the decode weights, and per row a full image's cross K/V and {report['length']} "
        f"tokens of self K/V, at the measured {report['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s.",
    ]
    for label, entry in variants.items():
        for key, title in (("profile_rows1", "rows 1"), ("profile_rows_max", "largest rows")):
            if key not in entry:
                continue
            prof = entry[key]
            lines += [
                "",
                f"## {label}, one eager step, {title}: {prof['kernels']} kernels, "
                f"{prof['kernel_ms']:.2f} ms of kernel time",
                "",
                "| kind | kernels | ms |",
                "|---|---|---|",
            ]
            for kind, row in sorted(prof["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
                lines.append(f"| {kind} | {row['count']} | {row['ms']:.3f} |")
            lines += ["", "| heaviest kernels | count | ms |", "|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['count']} | {t['ms']:.3f} |" for t in prof["top"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
