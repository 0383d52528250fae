"""GPU check and microbenchmark of the engine's NF4 kernel on the 11B text model's shapes.

``python -m bench.nf4_check --out DIR`` (CUDA, bitsandbytes, triton; about a minute on an H100):

1. correctness: the kernel (the engine's configs) against dequantise-then-matmul in fp32 at
   rows 1..128 for every shape, relative max error below ``TOLERANCE``;
2. CUDA graphs: a captured call replays to the same output (split-K included);
3. timing, warm, with CUDA events (``triton.testing.do_bench``) at rows 1..128 (decode)
   and 2048 (a prefill chunk): bf16 ``F.linear``, bitsandbytes' ``Linear4bit``, and the
   kernel under the engine's config and a few others (while ``--tune-budget-s``, shared
   evenly by the cases, lasts); the best is reported and written as the ``TUNED``
   table for ``worker/engine/nf4_configs.py``.

Writes ``nf4_check.json`` and ``nf4_tuned.py`` (the table to paste) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from worker.engine.nf4 import Nf4Linear, from_bnb
from worker.engine.nf4_configs import (
    GEMV_PRODUCT,
    Nf4Config,
    config_for,
    gemv_rows,
    split_for,
)

# (name, out_features, in_features) of the 11B text model: fused q/k/v, o, fused gate/up, down.
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
TIMED_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 2048]
BLOCKSIZE = 64
DEVICE, DTYPE = "cuda", torch.bfloat16  # what the engine runs nf4 in
# fp32 accumulation in another order than the reference's, then one rounding to bf16 (2^-8).
TOLERANCE = 1e-2


def candidates(rows: int, out_features: int, in_features: int) -> list[Nf4Config]:
    """The engine's config first, then others of every kind that may serve this row count."""
    base = config_for(rows, out_features, in_features, BLOCKSIZE)
    shapes: list[tuple[str, int, int, int, int]]  # kind, block_m, block_n, block_k, warps
    if rows <= 8:
        product = GEMV_PRODUCT // gemv_rows(rows)  # block_n * block_k in the same registers
        shapes = [
            ("gemv", 16, 16, product // 16, 4),
            ("gemv", 16, 32, product // 32, 4),
            ("gemv", 16, 64, product // 64, 4),
            ("gemv", 16, 64, 2 * product // 64, 8),
            ("mma", 16, 64, 128, 4),
        ]
    elif rows <= 64:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        shapes = [
            ("mma", block_m, 64, 128, 4),
            ("mma", block_m, 128, 64, 4),
            ("mma", block_m, 32, 256, 4),
            ("mma", block_m, 64, 256, 4),
            ("mma", block_m, 128, 128, 8),
        ]
    else:
        shapes = [
            ("mma", 64, 128, 64, 4),
            ("mma", 128, 64, 128, 8),
            ("mma", 128, 128, 64, 8),
            ("dequant", 0, 32, 512, 4),
            ("dequant", 0, 64, 256, 4),
            ("dequant", 0, 16, 1024, 4),
        ]
    found = [base]
    for kind, block_m, block_n, block_k, warps in shapes:
        if kind == "dequant":
            configs = [Nf4Config(kind, block_n, block_k, num_warps=warps)]
        else:
            tiles = -(-out_features // block_n) * (-(-rows // block_m) if kind == "mma" else 1)
            split = split_for(tiles, rows, in_features, block_k)
            # Twice the split too: more programs in flight hide more memory latency.
            configs = [
                Nf4Config(kind, block_n, block_k, s, block_m, warps, base.num_stages)
                for s in (split, 2 * split)
            ]
        found += [c for c in configs if c.fits(in_features, BLOCKSIZE) and c not in found]
    return found


def _quantised(out_features: int, in_features: int) -> tuple[torch.Tensor, object, Nf4Linear]:
    import bitsandbytes as bnb

    weight = torch.randn(out_features, in_features, dtype=DTYPE, device=DEVICE) * 0.02
    linear = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=DTYPE, quant_type="nf4"
    )
    linear.weight = bnb.nn.Params4bit(
        weight.cpu(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=BLOCKSIZE,
        compress_statistics=False,  # as the worker loads it (no double quantisation)
    )
    linear = linear.to(DEVICE)  # quantises
    return weight, linear, from_bnb(linear)


def _matmul(own: Nf4Linear, x: torch.Tensor, config: Nf4Config | None = None) -> torch.Tensor:
    from worker.engine.nf4_kernel import nf4_matmul

    return nf4_matmul(x, own.packed, own.absmax, own.code, own.blocksize, config)


def check_correctness(own: Nf4Linear) -> float:
    """The largest relative max error over rows 1..128."""
    reference_weight = own.dequantized().float()
    worst = 0.0
    for rows in range(1, 129):
        x = torch.randn(rows, own.in_features, dtype=DTYPE, device=DEVICE)
        reference = x.float() @ reference_weight.T
        error = (_matmul(own, x).float() - reference).abs().max() / reference.abs().max()
        worst = max(worst, error.item())
    return worst


def check_graph(own: Nf4Linear, rows: int) -> bool:
    """A CUDA graph of one call replays to the eager output for new inputs."""
    x = torch.randn(rows, own.in_features, dtype=DTYPE, device=DEVICE)
    _matmul(own, x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _matmul(own, x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    return torch.equal(captured, _matmul(own, x))


def _time_us(fn) -> float:
    from triton.testing import do_bench

    fn()  # warm: compiled and cached before timing
    return do_bench(fn, warmup=5, rep=20) * 1000.0


def time_shape(
    weight: torch.Tensor, linear, own: Nf4Linear, rows: int, tune_until: float
) -> dict[str, object]:
    """Times at ``rows``: bf16, bitsandbytes, and the kernel under each candidate config (the
    engine's always; the others while the tuning budget lasts). A config that fails to compile
    or launch, or whose output strays from the engine config's (checked above) by more than
    the tolerance, is recorded with the reason and not timed."""
    x = torch.randn(rows, own.in_features, dtype=DTYPE, device=DEVICE)
    with torch.inference_mode():
        bf16 = _time_us(lambda: F.linear(x, weight))
        bnb_us = _time_us(lambda: linear(x))
    expected = _matmul(own, x).float()
    tried: list[dict[str, object]] = []
    for config in candidates(rows, own.out_features, own.in_features):
        if tried and time.monotonic() > tune_until:
            break
        entry: dict[str, object] = {"config": asdict(config)}
        try:
            error = (_matmul(own, x, config).float() - expected).abs().max() / expected.abs().max()
            if error.item() < TOLERANCE:
                entry["us"] = _time_us(lambda config=config: _matmul(own, x, config))
            else:
                entry["error"] = f"relative max error {error.item():.2e} against the engine config"
        except Exception as exc:  # a config the card cannot run (shared memory, registers)
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        tried.append(entry)
    timed = [entry for entry in tried if "us" in entry]
    best = min(timed, key=lambda entry: entry["us"], default=None)
    return {
        "rows": rows,
        "bf16_us": bf16,
        "bnb_us": bnb_us,
        "engine_us": tried[0].get("us"),
        "ours_us": best and best["us"],
        "ours_over_bf16": best and best["us"] / bf16,
        "best_config": best and best["config"],
        "tried": tried,
    }


def _row_line(t: dict) -> str:
    head = f"{t['rows']:>4} {t['shape']:>8} {t['out_features']:>6}x{t['in_features']:<6}"
    times = f"{t['bf16_us']:>9.1f} {t['bnb_us']:>9.1f}"
    if t["best_config"] is None:
        return f"{head} {times}    failed (see the JSON)"
    best = Nf4Config(**t["best_config"])
    config = f"{best.kind} m{best.block_m} n{best.block_n} k{best.block_k} s{best.split_k}"
    return f"{head} {times} {t['ours_us']:>9.1f} {t['ours_over_bf16']:>9.2f}  {config}"


def tuned_table(timings: list[dict]) -> str:
    """``TUNED`` for nf4_configs.py: per shape, the best config for each timed row count."""
    lines = ["TUNED: dict[tuple[int, int], tuple[tuple[int, Nf4Config], ...]] = {"]
    for shape in sorted(
        {(t["out_features"], t["in_features"]) for t in timings if t["best_config"]}
    ):
        lines.append(f"    {shape}: (")
        for t in sorted(
            (t for t in timings if (t["out_features"], t["in_features"]) == shape),
            key=lambda t: t["rows"],
        ):
            if t["best_config"]:
                lines.append(f"        ({t['rows']}, {Nf4Config(**t['best_config'])!r}),")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _check(own: Nf4Linear) -> dict[str, object]:
    try:
        error = check_correctness(own)
        graphs = all(check_graph(own, rows) for rows in (1, 8, 64))
    except Exception as exc:
        return {"ok": False, "graph": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"max_rel_error": error, "ok": error < TOLERANCE, "graph": graphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tune-budget-s", type=float, default=50.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("nf4_check needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.monotonic()
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "tolerance": TOLERANCE}
    quantised = {name: _quantised(n, k) for name, n, k in SHAPES}
    checks = []
    for name, _, _ in SHAPES:
        checks.append({"shape": name} | _check(quantised[name][2]))
        print(checks[-1], flush=True)
    report["checks"] = checks
    tuning_from = time.monotonic()
    print(f"\nrows    shape {'out x in':>13} {'bf16 us':>9} {'bnb us':>9} {'ours us':>9} ours/bf16")
    timings: list[dict] = []
    cases = [(rows, shape) for rows in TIMED_ROWS for shape in SHAPES]
    for index, (rows, (name, n, k)) in enumerate(cases, start=1):
        tune_until = tuning_from + args.tune_budget_s * index / len(cases)
        weight, linear, own = quantised[name]
        t = {"shape": name, "out_features": n, "in_features": k}
        timings.append(t | time_shape(weight, linear, own, rows, tune_until))
        print(_row_line(timings[-1]), flush=True)
        report |= {"timings": timings, "seconds": time.monotonic() - started}
        (args.out / "nf4_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "nf4_tuned.py").write_text(tuned_table(timings))
    ok = all(c["ok"] and c["graph"] for c in checks)
    verdict = "all checks passed" if ok else "CHECKS FAILED"
    print(f"\n{verdict}; wrote nf4_check.json and nf4_tuned.py under {args.out}", end=" ")
    print(f"({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
