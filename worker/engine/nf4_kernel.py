"""The NF4 matmul: ``y = x @ dequant(W)^T`` with the codes dequantised in registers.

A packed byte holds two neighbouring columns of the weight: the high nibble the even column,
the low nibble the odd one. Rather than interleave them back in registers (a layout shuffle
through shared memory), the kernel splits ``x`` into its even and odd columns instead and sums
both halves' products. One kernel, two inner products over that dequantiser: GEMV-style for a
few rows (broadcast multiply and sum, no tensor cores) or ``tl.dot`` tiles (tensor cores). Both
may split K across programs, each writing fp32 partials that one sum reduces, so a small matmul
still fills the GPU. From a prefill's row counts the weight is dequantised once into the
compute dtype and cuBLAS multiplies it. Launch configs are fixed per (rows, out, in), so a
call captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from worker.engine.nf4_configs import Nf4Config, config_for, gemv_rows


@triton.jit
def _column_pairs(
    packed_ptr, absmax_ptr, code_ptr, offs_n, rows_in, b0, K: tl.constexpr,
    BB: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """Bytes ``b0 .. b0 + BB`` of weight rows ``offs_n``: the even and the odd columns they
    hold, each fp32 [BN, BB] (code value times its block's absmax)."""
    offs_b = b0 + tl.arange(0, BB)
    packed = tl.load(
        packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=rows_in[:, None], other=0
    ).to(tl.int32)
    scale = tl.load(
        absmax_ptr + offs_n[:, None] * (K // BS) + (offs_b // (BS // 2))[None, :],
        mask=rows_in[:, None],
        other=0.0,
    )
    # The 16-entry fp32 code table is one cache line: every lane's lookup hits it at once.
    even = tl.load(code_ptr + (packed >> 4)) * scale
    odd = tl.load(code_ptr + (packed & 0xF)) * scale
    return even, odd


@triton.jit(do_not_specialize=["M"])  # one compilation for every row count
def _nf4_matmul(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, stride_xm, K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, SPLIT_K: tl.constexpr,
    MMA: tl.constexpr,
):  # fmt: skip
    # Axis 0 over rows: programs launched together share a weight tile.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows_m = offs_m < M
    rows_n = offs_n < N
    k_len: tl.constexpr = K // SPLIT_K
    BB: tl.constexpr = BK // 2
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for step in range(0, k_len, BK):
        k0 = pid_k * k_len + step
        offs_k = k0 + 2 * tl.arange(0, BB)
        x_even = tl.load(x_rows + offs_k[None, :], mask=rows_m[:, None], other=0.0)
        x_odd = tl.load(x_rows + offs_k[None, :] + 1, mask=rows_m[:, None], other=0.0)
        even, odd = _column_pairs(
            packed_ptr, absmax_ptr, code_ptr, offs_n, rows_n, k0 // 2, K, BB, BS
        )
        if MMA:
            acc = tl.dot(x_even, tl.trans(even.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(odd.to(x_odd.dtype)), acc)
        else:
            products = x_even.to(tl.float32)[:, None, :] * even[None, :, :]
            products += x_odd.to(tl.float32)[:, None, :] * odd[None, :, :]
            acc += tl.sum(products, axis=2)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows_m[:, None] & rows_n[None, :])


@triton.jit
def _nf4_dequantize(
    packed_ptr, absmax_ptr, code_ptr, out_ptr, N, K: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    rows_n = offs_n < N
    b0 = tl.program_id(1) * (BK // 2)
    even, odd = _column_pairs(packed_ptr, absmax_ptr, code_ptr, offs_n, rows_n, b0, K, BK // 2, BS)
    out = out_ptr + offs_n[:, None] * K + 2 * (b0 + tl.arange(0, BK // 2))[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out, even.to(dtype), mask=rows_n[:, None])
    tl.store(out + 1, odd.to(dtype), mask=rows_n[:, None])


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    config: Nf4Config,
) -> torch.Tensor:
    """The weight [out, in] in ``dtype``, from ``config``'s tiles (``block_n`` x ``block_k``)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    weight = torch.empty(out_features, in_features, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(out_features, config.block_n), in_features // config.block_k)
    _nf4_dequantize[grid](
        packed, absmax, code, weight, out_features, in_features,
        BN=config.block_n, BK=config.block_k, BS=blocksize, num_warps=config.num_warps,
    )  # fmt: skip
    return weight


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    config: Nf4Config | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (bf16/fp16) times the NF4 weight [N, K] transposed -> [M, N] in x's dtype.

    ``config`` defaults to the table's for this shape (:func:`config_for`).
    """
    rows, in_features = x.shape
    out_features = packed.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if rows == 0:
        return x.new_empty(0, out_features)
    config = config or config_for(rows, out_features, in_features, blocksize)
    if config.kind == "dequant":
        return F.linear(x, nf4_dequantize(packed, absmax, code, blocksize, x.dtype, config))
    split = config.split_k
    out_dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty(split, rows, out_features, dtype=out_dtype, device=x.device)
    gemv = config.kind == "gemv"
    block_m = gemv_rows(rows) if gemv else config.block_m
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, config.block_n), split)
    _nf4_matmul[grid](
        x, packed, absmax, code, out, rows, out_features, x.stride(0), in_features,
        BM=block_m, BN=config.block_n, BK=config.block_k, BS=blocksize, SPLIT_K=split,
        MMA=not gemv, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
