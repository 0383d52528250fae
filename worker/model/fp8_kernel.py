"""The fp8 Linear's Triton kernels: the activation quantiser, a GEMV for one row and
a W8A8 tensor-core GEMM for a few rows.

- The quantiser: a program per row reads it once, takes its amax, and writes the e4m3 row and
  its scale. (Inductor's kernel for the same function, with dynamic shapes, took 40 us for 8 rows
  of 4,096 on an H100, longer than the GEMM it feeds.)
- The GEMV (one row: a decode step at batch 1): a program per ``block_n`` outputs takes the
  row's amax, then walks the row, quantising it as the quantiser would, against e4m3 weights
  widened to fp32 in registers: one kernel, the same numbers as the quantiser and the GEMM.
- The GEMM (2-64 rows): the quantised activation against the e4m3 weights on fp8 tensor cores,
  with the weight as the MMA's wide operand (``W @ x^T``: the many outputs fill the tile, the
  few rows pad it), both scales applied to the fp32 sums.
At these row counts cuBLASLt's rowwise ``_scaled_mm`` took 0.74-1.44x bf16's time on an H200,
these kernels 0.56-0.85x (BENCHMARKS.md, issue 12). The tile shapes are the best of a sweep on
an H200 over the 11B's decode shapes (``python -m bench.fp8_check --tiles`` reruns it); they
and the rules that fit them to a weight and to a card's shared memory are in
:mod:`worker.model.fp8_tiles`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from worker.model.fp8_tiles import MAX_ROWS, Tiles, fit, gemv_tiles, matmul_tiles, stages_that_fit


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, cols, stride_x, stride_q,
    BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    inside = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), MIN_AMAX) / FP8_MAX
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, y_ptr, K, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # The row's scale, as the quantiser takes it: every program reads the row (from L2).
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k + offs_k).to(tl.float32)))
    x_scale = tl.maximum(tl.max(amax, 0), MIN_AMAX) / FP8_MAX
    w_ptrs = w_ptr + offs_n[:, None] * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    # Summed across k once, after the loop: the loop itself only multiplies and adds.
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.clamp(tl.load(x_ptrs).to(tl.float32) / x_scale, -FP8_MAX, FP8_MAX)
        x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(w_ptrs).to(tl.float32) * x[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, 1) * tl.load(w_scale_ptr + offs_n) * x_scale
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty))


@triton.jit
def _fp8_matmul_kernel(
    q_ptr, q_scale_ptr, w_ptr, w_scale_ptr, y_ptr, M, K, stride_q, stride_w, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_w + offs_k[None, :]
    q_ptrs = q_ptr + offs_m[None, :] * stride_q + offs_k[:, None]
    in_m = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(w_ptrs), tl.load(q_ptrs, mask=in_m, other=0.0), acc)
        w_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    q_scale = tl.load(q_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    acc = acc * tl.load(w_scale_ptr + offs_n)[:, None] * q_scale[None, :]
    y_ptrs = y_ptr + offs_m[None, :] * stride_y + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_m)


def quantize_rows_kernel(
    x: torch.Tensor, fp8: torch.dtype, fp8_max: float, min_amax: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, k] as ``fp8`` [rows, k] and fp32 scales [rows, 1]."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=fp8, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(rows,)](
        x, q, scale, cols, x.stride(0), q.stride(0),
        BLOCK=block, FP8_MAX=fp8_max, MIN_AMAX=min_amax, num_warps=min(16, max(4, block // 1024)),
    )  # fmt: skip
    return q, scale


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory a block may use on this device (Triton's own limit)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, tiles: Tiles,
    fp8_max: float, min_amax: float,
) -> torch.Tensor:  # fmt: skip
    """One bf16 row ``x`` [1, in], quantised in the kernel exactly as
    :func:`quantize_rows_kernel` would, times the e4m3 ``weight`` [out, in] with fp32 ``scale``
    [1, out]."""
    out_features, in_features = weight.shape
    y = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(out_features // tiles.block_n,)](
        x.contiguous(), weight, scale, y, in_features, weight.stride(0),
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, FP8_MAX=fp8_max, MIN_AMAX=min_amax,
        num_warps=tiles.warps, num_stages=tiles.stages,
    )  # fmt: skip
    return y


def fp8_matmul(
    q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
    tiles: Tiles,
) -> torch.Tensor:  # fmt: skip
    """The quantised activation ``q`` [rows, in] (scales [rows, 1]) times the e4m3 ``weight``
    [out, in] (scales [1, out]), in bf16."""
    rows, in_features = q.shape
    out_features = weight.shape[0]
    block_m = max(16, min(MAX_ROWS, triton.next_power_of_2(rows)))
    stages = stages_that_fit(tiles, block_m, _max_shared_memory(q.device.index or 0))
    y = torch.empty(rows, out_features, dtype=torch.bfloat16, device=q.device)
    grid = (out_features // tiles.block_n, triton.cdiv(rows, block_m))
    _fp8_matmul_kernel[grid](
        q, q_scale, weight, scale, y, rows, in_features, q.stride(0), weight.stride(0),
        y.stride(0), BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.warps, num_stages=stages,
    )  # fmt: skip
    return y


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
    fp8: torch.dtype, fp8_max: float, min_amax: float,
) -> torch.Tensor | None:  # fmt: skip
    """``x`` [rows, in] bf16, quantised per row, through the e4m3 ``weight`` [out, in] and its
    scale [1, out]: the GEMV (quantising in the kernel) at one row, the quantiser then the GEMM
    up to :data:`MAX_ROWS`; None where neither serves (more rows, or a weight the tiles do not
    divide)."""
    rows = x.shape[0]
    out_features, in_features = weight.shape
    if rows == 1:
        tiles = fit(gemv_tiles(out_features), out_features, in_features)
        return None if tiles is None else fp8_gemv(x, weight, scale, tiles, fp8_max, min_amax)
    tiles = fit(matmul_tiles(rows, out_features), out_features, in_features)
    if rows > MAX_ROWS or tiles is None:
        return None
    q, q_scale = quantize_rows_kernel(x, fp8, fp8_max, min_amax)
    return fp8_matmul(q, q_scale, weight, scale, tiles)
