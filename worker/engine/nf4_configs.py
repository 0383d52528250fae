"""Launch configs of the NF4 kernels, per weight shape and row count.

``TUNED`` is filled from ``python -m bench.nf4_check`` (it prints the table to paste here);
shapes and row counts it does not cover get :func:`default_config`'s untuned guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Enough programs to keep every SM of an H100 (132) or H200 busy at two per SM.
TARGET_PROGRAMS = 264
# From this many rows the weight is dequantised once and cuBLAS multiplies it (a prefill).
DEQUANT_ROWS = 129
# The GEMV kernel holds its even and odd columns' [rows, block_n, block_k / 2] products in
# registers: at 4 warps, 8192 elements are 64 a thread, past which it spills.
GEMV_PRODUCT = 8192


@dataclass(frozen=True)
class Nf4Config:
    """One launch: ``gemv`` (broadcast-and-sum, any rows) or ``mma`` (``tl.dot`` tiles of
    ``block_m`` rows), K split over ``split_k`` programs whose fp32 partials are summed; or
    ``dequant``: the weight dequantised in ``block_n`` x ``block_k`` tiles, then cuBLAS."""

    kind: Literal["gemv", "mma", "dequant"]
    block_n: int
    block_k: int
    split_k: int = 1
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, in_features: int, blocksize: int) -> bool:
        """Whether each split of K is whole steps of ``block_k``, each whole absmax blocks."""
        span, rest = divmod(in_features, self.split_k)
        return not rest and self.block_k % blocksize == 0 and span % self.block_k == 0


#: (out_features, in_features) -> ((most rows, config), ...) ascending by rows.
TUNED: dict[tuple[int, int], tuple[tuple[int, Nf4Config], ...]] = {}


def split_for(tiles: int, rows: int, in_features: int, block_k: int) -> int:
    """How many ways to split K so ``tiles`` output tiles make about TARGET_PROGRAMS programs,
    while the fp32 partials (8 bytes an output per split: written, read) stay within a quarter
    of the NF4 weight's bytes (in / 2 per output feature)."""
    split = 1
    while (
        tiles * split * 2 <= TARGET_PROGRAMS
        and 2 * split * rows * 8 * 4 <= in_features // 2
        and in_features % (2 * split * block_k) == 0
    ):
        split *= 2
    return split


def gemv_rows(rows: int) -> int:
    """The GEMV kernel's row block: ``rows`` rounded up to a power of two."""
    return 1 << (rows - 1).bit_length()


def default_config(rows: int, out_features: int, in_features: int) -> Nf4Config:
    """An untuned config: GEMV up to 8 rows, tensor-core tiles beyond, K split while the
    output tiles alone would leave SMs idle; dequantise-then-cuBLAS from DEQUANT_ROWS."""
    if rows >= DEQUANT_ROWS:
        return Nf4Config("dequant", 32, 512)
    if rows <= 8:
        block_n = 32 if rows <= 4 else 16
        block_k = GEMV_PRODUCT // (gemv_rows(rows) * block_n)
        tiles = -(-out_features // block_n)
        return Nf4Config("gemv", block_n, block_k, split_for(tiles, rows, in_features, block_k))
    if rows > 64:
        block_m, block_n, block_k, warps = 128, 64, 128, 8
    else:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_n, block_k, warps = 64, 128, 4
    tiles = -(-rows // block_m) * -(-out_features // block_n)
    split = split_for(tiles, rows, in_features, block_k)
    return Nf4Config(
        "mma", block_n, block_k, split, block_m, warps, num_stages=4 if warps == 4 else 3
    )


def config_for(rows: int, out_features: int, in_features: int, blocksize: int) -> Nf4Config:
    """The tuned config for this shape and row count, else the default, else (where neither
    fits the blocksize) one step of one absmax block."""
    for most, config in TUNED.get((out_features, in_features), ()):
        if rows <= most and config.fits(in_features, blocksize):
            return config
    config = default_config(rows, out_features, in_features)
    if config.fits(in_features, blocksize):
        return config
    return Nf4Config(config.kind, config.block_n, blocksize, block_m=config.block_m)
