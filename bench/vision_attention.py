"""The vision tower's attention: SDPA against the worker's Triton kernel at several tiles.

    python -m bench.vision_attention [--out docs/bench] [--name NAME] [--reps 10]

The tower's attention is about half of a 4-tile image's vision time (BENCHMARKS.md, issue
10). It runs either as two unmasked SDPA calls and a concatenation
(``worker.engine.vision.fused_split_attention``) or as one Triton kernel
(``worker.engine.tile_attention``), whichever the tower measured faster at start-up. For each
vision shape the bench times SDPA and the kernel at every candidate tile shape (every shape
run once before timing), checks that they agree, prints TFLOP/s over the real attention work,
and marks what the worker would pick (its tiles, its rule). Rerun it on a new card kind
before changing the worker's tiles.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from bench.report import write_table
from worker.engine.tile_attention import HEAD_DIM, TILES, AttentionTiles, tile_attention
from worker.engine.timing import median_cuda_ms
from worker.engine.vision import attention_error, fused_split_attention, kernel_wins

#: Candidate tilings timed by the bench: ones Triton 3.9 compiles for sm_90 without spilling
#: registers (``python -m bench.compile_check``).
CANDIDATE_TILES = (
    TILES,
    AttentionTiles(128, 64, 8, 3),
    AttentionTiles(128, 32, 8, 2),
    AttentionTiles(64, 64, 4, 2),
)

#: (label, tiles encoded, real tiles) of the tower's attention shapes (1601 patches a tile,
#: padded to 1608): four tiles, one tile of four (padding tiles encoded), one tile alone.
SHAPES = (("4 tiles", 4, 4), ("1 tile of 4, encoded", 4, 1), ("1 tile, padding skipped", 1, 1))


def attention_flops(length: int, real: int, heads: int) -> float:
    """Multiply-adds of QK^T and PV over the pairs that attend, x2."""
    pairs = real * length + (length - real) * real
    return 4.0 * pairs * heads * HEAD_DIM


def run(batch: int, reps: int, device: torch.device) -> list[dict]:
    rows = []
    heads, patches, padded = 16, 1601, 1608
    for label, encoded, real_tiles in SHAPES:
        length, real = encoded * padded, real_tiles * patches
        qkv = torch.randn(batch, length, 3 * heads * HEAD_DIM, dtype=torch.bfloat16,
                          device=device)  # fmt: skip
        flops = attention_flops(length, real, heads) * batch
        want = fused_split_attention(qkv, heads, real)
        row: dict = {"shape": label, "length": length, "real": real, "batch": batch}
        ms = median_cuda_ms(
            lambda qkv=qkv, real=real: fused_split_attention(qkv, heads, real), reps
        )
        row["sdpa"] = {"ms": ms, "tflops": flops / ms / 1e9}
        for tiles in CANDIDATE_TILES:
            key = "triton {}x{} w{} s{}".format(*tiles)
            try:
                error = attention_error(tile_attention(qkv, heads, real, tiles), want)
                ms = median_cuda_ms(
                    lambda qkv=qkv, real=real, t=tiles: tile_attention(qkv, heads, real, t), reps
                )
                row[key] = {"ms": ms, "tflops": flops / ms / 1e9, "error": error}
                if tiles == TILES:
                    row["worker_picks"] = (
                        "kernel" if kernel_wins(row["sdpa"]["ms"], ms, error) else "sdpa"
                    )
            except Exception as exc:  # a tiling that does not compile on this card
                row[key] = {"failed": f"{type(exc).__name__}: {str(exc)[:80]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(results: dict) -> str:
    lines = [
        f"# Vision attention: {results['device']}, torch {results['torch']}, "
        f"triton {results['triton']}",
        "",
        "| shape | batch | attention | ms | TFLOP/s | error vs SDPA | worker picks |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for key, value in row.items():
            if not isinstance(value, dict):
                continue
            pick = row.get("worker_picks", "-") if key == "sdpa" else ""
            if "failed" in value:
                lines.append(f"| {row['shape']} | {row['batch']} | {key} | - | - | "
                             f"{value['failed']} | |")  # fmt: skip
                continue
            error = value.get("error")
            lines.append(
                f"| {row['shape']} | {row['batch']} | {key} | {value['ms']:.3f} | "
                f"{value['tflops']:.0f} | {'-' if error is None else f'{error:.4f}'} | {pick} |"
            )
    lines.append("")
    lines.append("error: max |kernel - SDPA| / max |SDPA|. worker picks: at the worker's tiles "
                 f"{tuple(TILES)}, by its start-up rule.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vision_attention", description=__doc__)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="images per call (the tower's largest)")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.vision_attention needs a CUDA GPU")
    device = torch.device("cuda")
    results = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": run(args.batch, args.reps, device),
    }
    name = args.name or f"vision-attention-{time.strftime('%Y-%m-%d')}"
    write_table(args.out, name, results, to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
