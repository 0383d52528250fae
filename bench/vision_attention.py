"""The vision tower's attention: what the worker runs against a Triton candidate.

    python -m bench.vision_attention [--out docs/bench] [--name NAME] [--reps 10]

The tower's attention (``worker.engine.vision.split_attention``: 16 heads of 80, real tokens
first, two unmasked SDPA calls and a concatenation) is about half of a 4-tile image's vision
time (BENCHMARKS.md, issue 10). The candidate, :func:`tile_attention`, is one kernel for the
same function: it reads q, k and v in place from the fused q/k/v projection's output, writes
the layout ``o_proj`` reads, and splits the head size 80 into 64 + 16 so no tensor-core work is
spent on padding to 128. For each vision shape the bench times both (every shape run once
before timing), checks that they agree, and prints TFLOP/s over the real attention work.
The candidate is wired into the worker only if it wins here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from worker.engine.vision import split_attention

HEAD_DIM = 80


class AttentionTiles(NamedTuple):
    block_m: int
    block_n: int
    warps: int
    stages: int


#: Candidate tilings timed by the bench.
CANDIDATE_TILES = (
    AttentionTiles(128, 64, 8, 2),
    AttentionTiles(128, 64, 4, 3),
    AttentionTiles(128, 128, 8, 2),
    AttentionTiles(64, 64, 4, 3),
)

#: (label, tiles encoded, real tiles) of the tower's attention shapes (1601 patches a tile,
#: padded to 1608): four tiles, one tile of four (padding tiles encoded), one tile alone.
SHAPES = (("4 tiles", 4, 4), ("1 tile of 4, encoded", 4, 1), ("1 tile, padding skipped", 1, 1))


@triton.jit
def _attend(
    acc_a, acc_b, row_max, row_sum, q_a, q_b, k_ptr, v_ptr, offs_m, lo, hi, length, real,
    stride_s, scale_log2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys ``lo:hi`` (whole blocks of ``BLOCK_N``). ``MASKED``: keys past
    ``length`` and, for queries past ``real``, keys past ``real`` are not seen."""
    dim_a = tl.arange(0, 64)
    dim_b = 64 + tl.arange(0, 16)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        cols = offs_n[None, :] * stride_s
        rows_n = offs_n[:, None] * stride_s
        if MASKED:
            in_n = offs_n < length
            k_a = tl.load(k_ptr + cols + dim_a[:, None], mask=in_n[None, :], other=0.0)
            k_b = tl.load(k_ptr + cols + dim_b[:, None], mask=in_n[None, :], other=0.0)
        else:
            k_a = tl.load(k_ptr + cols + dim_a[:, None])
            k_b = tl.load(k_ptr + cols + dim_b[:, None])
        scores = (tl.dot(q_a, k_a) + tl.dot(q_b, k_b)) * scale_log2
        if MASKED:
            seen = in_n[None, :] & ((offs_m[:, None] < real) | (offs_n[None, :] < real))
            scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        p = p.to(k_ptr.dtype.element_ty)
        if MASKED:
            v_a = tl.load(v_ptr + rows_n + dim_a[None, :], mask=in_n[:, None], other=0.0)
            v_b = tl.load(v_ptr + rows_n + dim_b[None, :], mask=in_n[:, None], other=0.0)
        else:
            v_a = tl.load(v_ptr + rows_n + dim_a[None, :])
            v_b = tl.load(v_ptr + rows_n + dim_b[None, :])
        acc_a = acc_a * rescale[:, None] + tl.dot(p, v_a)
        acc_b = acc_b * rescale[:, None] + tl.dot(p, v_b)
        row_max = new_max
    return acc_a, acc_b, row_max, row_sum


@triton.jit
def _tile_attention_kernel(
    qkv_ptr, o_ptr, length, real, stride_b, stride_s, stride_ob, stride_os, scale_log2,
    HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, image, head): queries below ``real`` see every key, the others the
    first ``real`` keys. The head's 80 channels are loaded as 64 + 16."""
    block = tl.program_id(0)
    image = tl.program_id(1) // HEADS
    head = tl.program_id(1) % HEADS
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dim_a = tl.arange(0, 64)
    dim_b = 64 + tl.arange(0, 16)
    q_ptr = qkv_ptr + image * stride_b + head * 80
    k_ptr = q_ptr + HEADS * 80
    v_ptr = k_ptr + HEADS * 80
    in_m = offs_m < length
    rows = offs_m[:, None] * stride_s
    q_a = tl.load(q_ptr + rows + dim_a[None, :], mask=in_m[:, None], other=0.0)
    q_b = tl.load(q_ptr + rows + dim_b[None, :], mask=in_m[:, None], other=0.0)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    # A block of real queries reads every key, its whole key blocks without a mask; a block
    # with padding queries reads the real keys only, through the mask.
    all_real = (block + 1) * BLOCK_M <= real
    unmasked = tl.where(all_real, length // BLOCK_N * BLOCK_N, 0)
    end = tl.where(block * BLOCK_M < real, length, real)
    acc_a, acc_b, row_max, row_sum = _attend(
        acc_a, acc_b, row_max, row_sum, q_a, q_b, k_ptr, v_ptr, offs_m, 0, unmasked, length,
        real, stride_s, scale_log2, BLOCK_N, False,
    )  # fmt: skip
    acc_a, acc_b, row_max, row_sum = _attend(
        acc_a, acc_b, row_max, row_sum, q_a, q_b, k_ptr, v_ptr, offs_m, unmasked, end, length,
        real, stride_s, scale_log2, BLOCK_N, True,
    )  # fmt: skip
    out_ptr = o_ptr + image * stride_ob + offs_m[:, None] * stride_os + head * 80
    tl.store(out_ptr + dim_a[None, :], (acc_a / row_sum[:, None]).to(o_ptr.dtype.element_ty),
             mask=in_m[:, None])  # fmt: skip
    tl.store(out_ptr + dim_b[None, :], (acc_b / row_sum[:, None]).to(o_ptr.dtype.element_ty),
             mask=in_m[:, None])  # fmt: skip


def tile_attention(
    qkv: torch.Tensor, heads: int, real: int, tiles: AttentionTiles = CANDIDATE_TILES[0]
) -> torch.Tensor:
    """``split_attention`` of the q/k/v projection's output ``qkv`` [B, S, 3 * heads * 80]
    (q, k, v each ``heads`` x 80, real tokens first): [B, S, heads * 80]."""
    batch, length, width = qkv.shape
    assert width == 3 * heads * HEAD_DIM and qkv.stride(2) == 1
    out = torch.empty(batch, length, heads * HEAD_DIM, dtype=qkv.dtype, device=qkv.device)
    grid = (triton.cdiv(length, tiles.block_m), batch * heads)
    _tile_attention_kernel[grid](
        qkv, out, length, real, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        math.log2(math.e) / math.sqrt(HEAD_DIM), HEADS=heads, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return out


def worker_attention(qkv: torch.Tensor, heads: int, real: int) -> torch.Tensor:
    """What the tower runs: the projection chunked into q, k, v, then ``split_attention``."""
    batch, length, _ = qkv.shape
    q, k, v = (t.reshape(batch, length, heads, HEAD_DIM) for t in qkv.chunk(3, dim=-1))
    return split_attention(q, k, v, real)


def _timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` after one untimed run (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
        want = worker_attention(qkv, heads, real)
        row: dict = {"shape": label, "length": length, "real": real, "batch": batch}
        ms = _timed(lambda qkv=qkv, real=real: worker_attention(qkv, heads, real), reps)
        row["worker"] = {"ms": ms, "tflops": flops / ms / 1e9}
        for tiles in CANDIDATE_TILES:
            key = "triton {}x{} w{} s{}".format(*tiles)
            try:
                got = tile_attention(qkv, heads, real, tiles)
                error = float((got.float() - want.float()).abs().max())
                ms = _timed(lambda qkv=qkv, real=real, t=tiles: tile_attention(qkv, heads, real, t),
                            reps)  # fmt: skip
                row[key] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_error": error}
            except Exception as exc:  # a tiling that does not compile on this card
                row[key] = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(results: dict) -> str:
    lines = [
        f"# Vision attention: {results['device']}, torch {results['torch']}, "
        f"triton {results['triton']}",
        "",
        "| shape | batch | kernel | ms | TFLOP/s | max abs error vs worker |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for key, value in row.items():
            if not isinstance(value, dict):
                continue
            if "error" in value:
                lines.append(f"| {row['shape']} | {row['batch']} | {key} | - | - | "
                             f"{value['error']} |")  # fmt: skip
                continue
            error = value.get("max_abs_error")
            lines.append(
                f"| {row['shape']} | {row['batch']} | {key} | {value['ms']:.3f} | "
                f"{value['tflops']:.0f} | {'-' if error is None else f'{error:.4f}'} |"
            )
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    text = to_markdown(results)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
