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

Prints tables and writes ``fp8_check.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
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
    Fp8Linear,
    check_fp8_device,
    quantize_activation,
    quantize_language_model,
    quantize_rows,
)

#: (out, in) of the 11B's decode GEMMs.
SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
ROWS = (1, 8, 16, 32, 64, 128)
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


def gemm_table(device: str) -> list[dict]:
    results = []
    for name, (out_f, in_f) in SHAPES.items():
        copies = max(1, math.ceil(CYCLE_BYTES / (out_f * in_f)))
        torch.manual_seed(0)
        linears = [
            nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
            for _ in range(copies)
        ]
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
