"""The vision tower's attention as one Triton kernel (CUDA only; imported where it runs).

The tower's attention (16 heads of 80, real tokens first: queries below ``real`` see every
key, the others the first ``real`` keys) otherwise runs as two unmasked SDPA calls and a
concatenation (:func:`worker.engine.vision.split_attention`). This kernel computes the same
function in one launch: it reads q, k and v in place from the fused q/k/v projection's output,
writes the layout ``o_proj`` reads, and splits the head size 80 into 64 + 16 so no
tensor-core work is spent on padding it to 128. The tower times it against SDPA at start-up
and keeps it only at the shapes where it is faster (:meth:`VisionTower.choose_attention`);
``python -m bench.vision_attention`` sweeps its tile shapes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

HEAD_DIM = 80


class AttentionTiles(NamedTuple):
    block_m: int
    block_n: int
    warps: int
    stages: int


#: The tiles the worker launches.
TILES = AttentionTiles(128, 64, 8, 2)


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
        # Unscaled scores, the 16 channels accumulated onto the 64; the scale (log2 e / sqrt(80))
        # goes into the exponent's multiply-add, and the running max is kept scaled.
        scores = tl.dot(q_b, k_b, tl.dot(q_a, k_a))
        if MASKED:
            seen = in_n[None, :] & ((offs_m[:, None] < real) | (offs_n[None, :] < real))
            scores = tl.where(seen, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * scale_log2)
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores * scale_log2 - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        p = p.to(k_ptr.dtype.element_ty)
        if MASKED:
            v_a = tl.load(v_ptr + rows_n + dim_a[None, :], mask=in_n[:, None], other=0.0)
            v_b = tl.load(v_ptr + rows_n + dim_b[None, :], mask=in_n[:, None], other=0.0)
        else:
            v_a = tl.load(v_ptr + rows_n + dim_a[None, :])
            v_b = tl.load(v_ptr + rows_n + dim_b[None, :])
        acc_a = tl.dot(p, v_a, acc_a * rescale[:, None])
        acc_b = tl.dot(p, v_b, acc_b * rescale[:, None])
        row_max = new_max
    return acc_a, acc_b, row_max, row_sum


# One compiled kernel for every shape: token counts are not specialised on (divisibility).
@triton.jit(do_not_specialize=["length", "real"])
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
    qkv: torch.Tensor, heads: int, real: int, tiles: AttentionTiles = TILES
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
