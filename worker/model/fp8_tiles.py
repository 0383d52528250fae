"""Tile shapes of the fp8 Linear's Triton kernels (``worker.model.fp8_kernel``), and the rules
that fit them to a weight and to a card's shared memory. No Triton here: the rules are plain
arithmetic, checked on any machine.
"""

from __future__ import annotations

from typing import NamedTuple

#: The most rows the kernels serve; more (a prefill) go to cuBLASLt.
MAX_ROWS = 64


class Tiles(NamedTuple):
    block_n: int
    block_k: int
    warps: int
    stages: int


GEMV_WIDE = Tiles(16, 256, 4, 3)  # 16,384 outputs or more (gate/up)
GEMV_NARROW = Tiles(8, 1024, 4, 2)  # 4,096 or fewer (o, down)
GEMV_MIDDLE = Tiles(16, 512, 8, 2)  # between (q/k/v)
MATMUL_WIDE = Tiles(64, 128, 4, 3)  # 16,384 outputs or more at over 16 rows
MATMUL = Tiles(64, 256, 4, 5)
#: Every tile shape the kernels may launch, for the start-up probe.
ALL_GEMV_TILES = (GEMV_WIDE, GEMV_NARROW, GEMV_MIDDLE)
ALL_MATMUL_TILES = (MATMUL_WIDE, MATMUL)


def gemv_tiles(out_features: int) -> Tiles:
    if out_features >= 16384:
        return GEMV_WIDE
    return GEMV_NARROW if out_features <= 4096 else GEMV_MIDDLE


def matmul_tiles(rows: int, out_features: int) -> Tiles:
    return MATMUL_WIDE if out_features >= 16384 and rows > 16 else MATMUL


def fit(tiles: Tiles, out_features: int, in_features: int) -> Tiles | None:
    """``tiles`` shrunk to divide the weight (the kernels have no edge masks), or None where
    that would leave blocks smaller than fp8 tensor cores take (16 x 32)."""
    block_n = min(tiles.block_n, out_features & -out_features)
    block_k = min(tiles.block_k, in_features & -in_features)
    if block_n < min(16, tiles.block_n) or block_k < 32:
        return None
    return tiles._replace(block_n=block_n, block_k=block_k)


def stages_that_fit(tiles: Tiles, block_m: int, max_shared: int) -> int:
    """The GEMM's pipeline depth: ``tiles.stages``, or fewer where that many buffered weight and
    activation tiles (e4m3, one byte an element) would not fit ``max_shared`` bytes. Triton
    3.9 holds ``stages`` of them on Hopper (160 KiB for MATMUL at 64 rows) and ``stages - 1``
    on Ada, whose 99 KiB a block the deepest tiles would otherwise overflow
    (``python -m bench.compile_check``)."""
    per_stage = tiles.block_k * (tiles.block_n + block_m)
    return max(1, min(tiles.stages, max_shared // per_stage))
