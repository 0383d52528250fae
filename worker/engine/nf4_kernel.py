"""The NF4 matmul: ``y = x @ dequant(W)^T`` with the codes dequantised in registers.

One kernel, two inner products over one dequantiser: GEMV-style for a few rows (broadcast
multiply and sum, no tensor cores) or tiles feeding ``tl.dot`` (tensor cores). Both may split
K across programs, each writing fp32 partials that one sum reduces, so a small matmul still
fills the GPU. Launch configs are fixed per (rows, out, in), so a call captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.nf4_configs import Nf4Config, config_for, gemv_rows


@triton.jit
def _dequant_tile(
    packed_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    """Weight rows ``offs_n``, columns ``k0 .. k0 + BK`` as fp32 [BN, BK] (BK a multiple of BS)."""
    rows_in = offs_n[:, None] < N
    offs_b = k0 // 2 + tl.arange(0, BK // 2)
    packed = tl.load(
        packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=rows_in, other=0
    )
    nibbles = tl.join((packed >> 4).to(tl.int32), (packed & 0xF).to(tl.int32))
    values = tl.load(code_ptr + tl.reshape(nibbles, [BN, BK]))
    offs_s = k0 // BS + tl.arange(0, BK // BS)
    scales = tl.load(
        absmax_ptr + offs_n[:, None] * (K // BS) + offs_s[None, :], mask=rows_in, other=0.0
    )
    scaled = tl.reshape(values, [BN, BK // BS, BS]) * scales[:, :, None]
    return tl.reshape(scaled, [BN, BK])


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
    k_len: tl.constexpr = K // SPLIT_K
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for step in range(0, k_len, BK):
        k0 = pid_k * k_len + step
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=offs_m[:, None] < M,
            other=0.0,
        )
        w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, offs_n, k0, N, K, BN, BK, BS)
        if MMA:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            # The weight rounded to the compute dtype, as the dequantised reference weight is.
            w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(
        out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)
    )


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
    split = config.split_k
    out_dtype = x.dtype if split == 1 else torch.float32
    out = torch.empty(split, rows, out_features, dtype=out_dtype, device=x.device)
    args = (x, packed, absmax, code, out, rows, out_features, x.stride(0), in_features)
    meta = dict(
        BN=config.block_n,
        BK=config.block_k,
        BS=blocksize,
        SPLIT_K=split,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    gemv = config.kind == "gemv"
    block_m = gemv_rows(rows) if gemv else config.block_m
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, config.block_n), split)
    _nf4_matmul[grid](*args, BM=block_m, MMA=not gemv, **meta)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
