"""GPU check and microbenchmark of the engine's NF4 Linears on the 11B text model's shapes.

``python -m bench.nf4_check --out DIR`` (CUDA and bitsandbytes; about a minute on an H100):

1. correctness: each fused :class:`~worker.engine.nf4.Nf4Linear` (bitsandbytes' ``matmul_4bit``
   on the concatenated storage) against dequantise-then-matmul in fp32, relative max error
   below ``TOLERANCE`` at every timed row count;
2. CUDA graphs: a captured call replays to the eager output for new inputs;
3. timing, warm, with CUDA events (``triton.testing.do_bench``) per layer group (q/k/v, o,
   gate/up, down): bf16 ``F.linear`` on the fused weight, bitsandbytes' ``Linear4bit`` modules
   one after another (what an unfused model runs), and the engine's fused Nf4Linear;
4. quality: the random 11B greedily decodes ``--steps`` tokens in bf16, then scores them in bf16
   and after NF4 quantisation in place (:mod:`bench.quality`).

Writes ``nf4_check.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import model_factory as mf
from bench.quality import agreement, nf4_linear, noise_image, quantize_nf4
from worker.engine.fused import fuse_linears
from worker.engine.nf4 import Nf4Linear, from_bnb

# The 11B text model's projections per group, (out_features, in_features) each.
GROUPS = {
    "qkv": [(4096, 4096), (1024, 4096), (1024, 4096)],
    "o": [(4096, 4096)],
    "gate_up": [(14336, 4096), (14336, 4096)],
    "down": [(4096, 14336)],
}
TIMED_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 2048]
BLOCKSIZE = 64
DEVICE, DTYPE = "cuda", torch.bfloat16  # what the engine runs nf4 in
# fp32 accumulation in another order than the reference's, then one rounding to bf16 (2^-8).
TOLERANCE = 1e-2


def _quantised(out_features: int, in_features: int):
    weight = torch.randn(out_features, in_features, dtype=DTYPE, device=DEVICE) * 0.02
    return weight, nf4_linear(weight.clone(), blocksize=BLOCKSIZE)


def _time_us(fn) -> float:
    from triton.testing import do_bench

    fn()  # warm: every shape run once before timing
    return do_bench(fn, warmup=5, rep=20) * 1000.0


def _graph_replays(fused: Nf4Linear, rows: int) -> bool:
    x = torch.randn(rows, fused.in_features, dtype=DTYPE, device=DEVICE)
    fused(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    return torch.equal(captured, fused(x))


def check_group(name: str, shapes: list[tuple[int, int]]) -> dict[str, object]:
    """Correctness, graph replay and timings of one layer group."""
    pairs = [_quantised(n, k) for n, k in shapes]
    weight = torch.cat([w for w, _ in pairs])
    modules = [linear for _, linear in pairs]
    fused = fuse_linears(*[from_bnb(linear) for linear in modules])
    assert isinstance(fused, Nf4Linear)
    reference_weight = fused.dequantized().float()
    rows_out = []
    for rows in TIMED_ROWS:
        x = torch.randn(rows, fused.in_features, dtype=DTYPE, device=DEVICE)
        with torch.inference_mode():
            reference = x.float() @ reference_weight.T
            error = ((fused(x).float() - reference).abs().max() / reference.abs().max()).item()
            bf16 = _time_us(lambda x=x: F.linear(x, weight))
            unfused = _time_us(lambda x=x: [linear(x) for linear in modules])
            ours = _time_us(lambda x=x: fused(x))
        rows_out.append(
            {"rows": rows, "max_rel_error": error, "bf16_us": bf16, "bnb_unfused_us": unfused,
             "fused_us": ours, "fused_over_bf16": ours / bf16}
        )  # fmt: skip
        print(
            f"{rows:>5} {name:>8} {bf16:>9.1f} {unfused:>12.1f} {ours:>9.1f} {ours / bf16:>9.2f}"
            f" {error:>9.1e}",
            flush=True,
        )
    graph = all(_graph_replays(fused, rows) for rows in (1, 16, 64))
    ok = graph and all(r["max_rel_error"] < TOLERANCE for r in rows_out)
    return {"group": name, "shapes": shapes, "graph": graph, "ok": ok, "timings": rows_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300, help="decode steps scored (0: none)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("nf4_check needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.monotonic()
    import bitsandbytes

    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "tolerance": TOLERANCE,
    }
    print(f"{report['device']}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    print(f"{'rows':>5} {'group':>8} {'bf16 us':>9} {'bnb unfused':>12} {'fused us':>9} "
          f"{'fused/bf16':>9} {'rel err':>9}")  # fmt: skip
    groups = []
    for name, shapes in GROUPS.items():
        groups.append(check_group(name, shapes))
        report |= {"groups": groups, "seconds": time.monotonic() - started}
        (args.out / "nf4_check.json").write_text(json.dumps(report, indent=2))
    if args.steps:
        model = mf.build_random_model(mf.build_config("11b"), device=DEVICE, dtype=DTYPE)
        report["quality"] = agreement(
            model, mf.build_processor(), quantize_nf4, steps=args.steps, image=noise_image(0)
        )
        del model
        print(f"quality (random 11B, nf4 vs bf16): {report['quality']}")
        (args.out / "nf4_check.json").write_text(json.dumps(report, indent=2))
    ok = all(g["ok"] for g in groups)
    verdict = "all checks passed" if ok else "CHECKS FAILED"
    print(f"\n{verdict}; wrote {args.out / 'nf4_check.json'} ({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
