"""``python -m bench.fp8_check --out DIR``: the fp8 Linear on a GPU, against bf16.

1. GEMMs: on the 11B's decode shapes (q/k/v fused, o, gate/up fused, down), bf16 ``F.linear``
   and :class:`~worker.model.fp8.Fp8Linear` (activation quantisation included) at 1-128 rows,
   each replayed from a CUDA graph as the engine runs them, cycling through enough weight
   copies that none is served from L2. Also their relative error against bf16 and against a
   dequantise-then-matmul reference (the kernel's own check), the activation quantisation's
   own time, and the CUDA kernels one fp8 call launches.
2. Quality: the random 11B (the bench's model) greedily decodes ``--steps`` tokens for an image
   question in bf16; then bf16 and fp8 (quantised in place, as ``load_model`` does) each score
   that sequence in one forward: relative logits error and top-1 agreement per decode step.
3. With ``--vision``: the vision tower's GEMMs (q/k/v fused, o, fc1, fc2) at one and at four
   4-tile images (6,432 and 25,728 rows), bf16 against the fp8 Linear's path for that many
   rows (the quantiser, then cuBLASLt's rowwise ``_scaled_mm``): what fp8 in the tower would
   save. The worker keeps the tower in bf16; this says whether it should not.
4. With ``--tiles``: every candidate tile shape of :mod:`worker.model.fp8_kernel`'s GEMV (one
   row) and GEMM (2-64 rows) on the same shapes, timed the same way, next to the tiles the
   worker picks. Rerun it on a new card kind before trusting the worker's table there.

Prints tables and writes ``fp8_check.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import model_factory as mf
from bench.quality import agreement, noise_image
from worker.model.fp8 import (
    _MIN_AMAX,
    FP8,
    FP8_MAX,
    Fp8Linear,
    check_fp8_device,
    quantize_activation,
    quantize_language_model,
    quantize_rows,
)
from worker.model.fp8_tiles import Tiles, gemv_tiles, matmul_tiles

#: (out, in) of the 11B's decode GEMMs.
SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
ROWS = (1, 8, 16, 32, 64, 128)
#: (out, in) of the vision tower's GEMMs (32 + 8 layers of each), and its rows per image.
VISION_SHAPES = {"qkv": (3840, 1280), "o": (1280, 1280), "fc1": (5120, 1280), "fc2": (1280, 5120)}
VISION_LAYERS = 40
VISION_ROWS_PER_IMAGE = 4 * 1608
TILE_ROWS = (1, 2, 8, 16, 32, 64)
#: Candidate (block_n, block_k, warps, stages) of the GEMV and of the GEMM, for ``--tiles``.
GEMV_TILES = list(itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (2, 3)))
MATMUL_TILES = list(itertools.product((64, 128), (128, 256), (4, 8), (3, 4, 5)))


#: fp8 weight bytes cycled through per shape: well past the L2 of an H100 (50 MB) or H200.
CYCLE_BYTES = 256e6
CALLS_PER_GRAPH = 24
REPLAYS = 5


def graph_us(fns: list[Callable[[], torch.Tensor]]) -> float:
    """Microseconds per call of ``fns`` (called in turn), captured in one CUDA graph of
    :data:`CALLS_PER_GRAPH` calls: the median of :data:`REPLAYS` timed replays."""
    for fn in fns:
        fn()  # compiles and picks kernels off the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS_PER_GRAPH)
    return statistics.median(times)


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def kernels_per_call(device: str, rows: int = 16) -> int | None:
    """CUDA kernels one fp8 q/k/v call launches: 2 (quantisation, GEMM) when it is right."""
    out_f, in_f = SHAPES["qkv"]
    lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(rows, in_f, device=device, dtype=torch.bfloat16)
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            fp8(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fp8(x)
                torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # the profiler is a nicety here; the timings stand without it
        return None


def weight_copies(device: str, out_f: int, in_f: int) -> list[nn.Linear]:
    """bf16 Linears of one shape, enough of them (:data:`CYCLE_BYTES`) that calls cycling
    through them read every weight from memory, not L2."""
    torch.manual_seed(0)
    return [
        nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
        for _ in range(max(2, math.ceil(CYCLE_BYTES / (out_f * in_f))))
    ]


def gemm_table(device: str) -> list[dict]:
    results = []
    for name, (out_f, in_f) in SHAPES.items():
        linears = weight_copies(device, out_f, in_f)
        fp8s = [Fp8Linear.from_linear(lin) for lin in linears]
        for rows in ROWS:
            x = torch.randn(rows, in_f, device=device, dtype=torch.bfloat16)
            entry: dict = {"shape": name, "out": out_f, "in": in_f, "rows": rows}
            try:
                with torch.inference_mode():
                    entry["bf16_us"] = graph_us(
                        [lambda x=x, w=lin.weight: F.linear(x, w) for lin in linears]
                    )
                    entry["fp8_us"] = graph_us([lambda x=x, f=f: f(x) for f in fp8s])
                    # The activation quantisation alone: what fusing it upstream would save.
                    entry["quant_us"] = graph_us([lambda x=x: quantize_activation(x)[0]])
                    exact, out = linears[0](x), fp8s[0](x)
                    q, scale = quantize_rows(x)
                    reference = (q.float() * scale) @ fp8s[0].dequantized().t()
                entry["ratio"] = entry["fp8_us"] / entry["bf16_us"]
                entry["rel_err_vs_bf16"] = rel_err(out, exact)
                entry["rel_err_vs_dequantized"] = rel_err(out, reference)
            except Exception as exc:  # keep the other shapes' numbers
                entry["error"] = f"{type(exc).__name__}: {exc}"
            results.append(entry)
        del linears, fp8s
        torch.cuda.empty_cache()
    return results


def vision_table(device: str) -> list[dict]:
    """The tower's GEMMs in bf16 and through the fp8 Linear, at 1 and 4 images of 4 tiles."""
    results = []
    torch.manual_seed(0)
    for images in (1, 4):
        rows = images * VISION_ROWS_PER_IMAGE
        for name, (out_f, in_f) in VISION_SHAPES.items():
            linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
            fp8 = Fp8Linear.from_linear(linear)
            x = torch.randn(rows, in_f, device=device, dtype=torch.bfloat16)
            entry: dict = {"shape": name, "images": images, "rows": rows}
            try:
                with torch.inference_mode():
                    entry["bf16_us"] = graph_us([lambda x=x, w=linear.weight: F.linear(x, w)])
                    entry["fp8_us"] = graph_us([lambda x=x, f=fp8: f(x)])
                    entry["rel_err_vs_bf16"] = rel_err(fp8(x), linear(x))
                entry["ratio"] = entry["fp8_us"] / entry["bf16_us"]
            except Exception as exc:  # keep the other shapes' numbers
                entry["error"] = f"{type(exc).__name__}: {exc}"
            results.append(entry)
            print(f"vision {name} x{images} images: {entry}", flush=True)
            del linear, fp8, x
        torch.cuda.empty_cache()
        done = [e for e in results if e["images"] == images and "error" not in e]
        if len(done) == len(VISION_SHAPES):
            per_image = {
                key: sum(e[f"{key}_us"] for e in done) * VISION_LAYERS / images / 1000
                for key in ("bf16", "fp8")
            }
            results.append({"images": images, "tower_gemm_ms_per_image": per_image})
            print(
                f"vision GEMMs per 4-tile image, {images} at a time: bf16 "
                f"{per_image['bf16']:.1f} ms, fp8 {per_image['fp8']:.1f} ms",
                flush=True,
            )
    return results


def kernel_call(x: torch.Tensor, linear: Fp8Linear, tiles: Tiles) -> Callable[[], torch.Tensor]:
    """The kernel the worker runs at ``x``'s row count, with ``tiles``."""
    from worker.model import fp8_kernel as kernel  # Triton: CUDA hosts only

    if x.shape[0] == 1:
        return lambda: kernel.fp8_gemv(x, linear.weight, linear.scale, tiles, FP8_MAX, _MIN_AMAX)

    def quantise_then_matmul() -> torch.Tensor:
        q, q_scale = kernel.quantize_rows_kernel(x, FP8, FP8_MAX, _MIN_AMAX)
        return kernel.fp8_matmul(q, q_scale, linear.weight, linear.scale, tiles)

    return quantise_then_matmul


def tile_table(device: str) -> list[dict]:
    """Every candidate tile shape of the GEMV (one row) and the GEMM (more rows, quantiser
    included) against the tiles the worker picks, per shape and row count; printed as it goes."""
    results = []
    for name, (out_f, in_f) in SHAPES.items():
        linears = weight_copies(device, out_f, in_f)
        fp8s = [Fp8Linear.from_linear(lin) for lin in linears]
        for rows in TILE_ROWS:
            x = torch.randn(rows, in_f, device=device).bfloat16()
            picked = gemv_tiles(out_f) if rows == 1 else matmul_tiles(rows, out_f)
            times = {}
            for candidate in GEMV_TILES if rows == 1 else MATMUL_TILES:
                tiles = Tiles(*candidate)
                try:
                    times[tiles] = graph_us([kernel_call(x, f, tiles) for f in fp8s])
                except Exception:  # a tile shape this card cannot hold (shared memory)
                    continue
            best = min(times, key=times.get)
            entry = {
                "shape": name,
                "rows": rows,
                "bf16_us": graph_us([lambda x=x, w=lin.weight: F.linear(x, w) for lin in linears]),
                "best": best._asdict(),
                "best_us": times[best],
                "picked": picked._asdict(),
                "picked_us": times.get(picked),
            }
            results.append(entry)
            print(
                f"{name:>8} {rows:>4}  bf16 {entry['bf16_us']:7.1f}  best {times[best]:7.1f} "
                f"{tuple(best)}  picked {entry['picked_us'] or float('nan'):7.1f} {tuple(picked)}"
            )
        del linears, fp8s
        torch.cuda.empty_cache()
    return results


def quality(device: str, steps: int) -> dict:
    """Logits of fp8 against bf16 on the random 11B, teacher-forced on bf16's greedy tokens."""
    model = mf.build_random_model(mf.build_config("11b"), device=device, dtype=torch.bfloat16)
    result = agreement(
        model, mf.build_processor(), quantize_language_model, steps=steps, image=noise_image(0)
    )
    del model
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fp8_check", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for fp8_check.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=300, help="decode steps scored (0: no quality)")
    p.add_argument("--tiles", action="store_true", help="also sweep the kernels' tile shapes")
    p.add_argument("--vision", action="store_true", help="also the vision tower's GEMMs in fp8")
    args = p.parse_args(argv)
    check_fp8_device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "gemms": gemm_table(args.device),
        "kernels_per_fp8_call": kernels_per_call(args.device),
    }
    print(f"{results['device']}, torch {results['torch']}; us per call, CUDA-graph replay")
    print(f"{'rows':>5} {'shape':>8} {'bf16 us':>9} {'fp8 us':>9} {'ratio':>6} "
          f"{'quant us':>9} {'err/bf16':>9} {'err/deq':>9}")  # fmt: skip
    for e in results["gemms"]:
        if "error" in e:
            print(f"{e['rows']:>5} {e['shape']:>8}  failed: {e['error'][:200]}")
            continue
        print(
            f"{e['rows']:>5} {e['shape']:>8} {e['bf16_us']:>9.1f} {e['fp8_us']:>9.1f} "
            f"{e['ratio']:>6.2f} {e['quant_us']:>9.1f} {e['rel_err_vs_bf16']:>9.4f} "
            f"{e['rel_err_vs_dequantized']:>9.5f}"
        )
    print(f"CUDA kernels per fp8 Linear call (qkv, 16 rows): {results['kernels_per_fp8_call']}")
    if args.vision:
        results["vision"] = vision_table(args.device)
    if args.tiles:
        print("tile shapes, us per call; tiles are (block_n, block_k, warps, stages)")
        results["tiles"] = tile_table(args.device)
    if args.steps:
        try:
            results["quality"] = quality(args.device, args.steps)
        except Exception as exc:
            results["quality"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"quality (random 11B, fp8 vs bf16): {results['quality']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fp8_check.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
