"""Split-KV ("flash-decoding") attention for one query token per row, in Triton.

Each row reads only its own keys: ``lengths[row]`` of them from the start of its K/V span, with
no mask tensor. The span is cut into ``splits`` chunks; one program takes one (row, KV head,
chunk) and all the query heads of that KV head (GQA), keeping an online softmax; a second kernel
merges the chunks by their log-sum-exp. Launch shapes depend only on (rows, span), so the
kernels replay inside the decode step's CUDA graphs; the chunk count is an argument, not a
compile-time constant, so every bucket shares two compiled kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner iteration
MAX_SPLITS = 32


@triton.jit
def _split_kv_attention_chunk(
    q_ptr, k_ptr, v_ptr, lengths_ptr, out_ptr, part_ptr, lse_ptr,
    stride_qr, stride_qh,
    stride_kr, stride_ks, stride_kh,
    stride_vr, stride_vs, stride_vh,
    stride_or,
    scale, chunk, span, splits,
    HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row).to(tl.int32)
    start = split * chunk
    # A parked row's length may pass the span; the last chunk may too.
    end = tl.minimum(tl.minimum(start + chunk, length), span)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, DIM)
    heads = kv_head * GROUP + g
    in_group = g < GROUP
    q = tl.load(
        q_ptr + row * stride_qr + heads[:, None] * stride_qh + d[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DIM], tl.float32)
    k_row = k_ptr + row * stride_kr + kv_head * stride_kh
    v_row = v_ptr + row * stride_vr + kv_head * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(k_row + n[:, None] * stride_ks + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_row + n[:, None] * stride_vs + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    seen = denom > 0
    acc = acc / tl.where(seen, denom, 1.0)[:, None]
    if DIRECT:  # one chunk: the output itself
        out = out_ptr + row * stride_or + heads[:, None] * DIM + d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        part = (row * HEADS + heads) * splits + split
        tl.store(part_ptr + part[:, None] * DIM + d[None, :], acc, mask=in_group[:, None])
        lse = tl.where(seen, m + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=in_group)


@triton.jit
def _split_kv_attention_merge(
    part_ptr, lse_ptr, out_ptr, stride_or, splits,
    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, DIM)
    first = (row * HEADS + head) * splits
    used = s < splits
    lse = tl.load(lse_ptr + first + s, mask=used, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    parts = tl.load(part_ptr + (first + s[:, None]) * DIM + d[None, :], mask=used[:, None])
    out = tl.sum(tl.where(used[:, None], parts * weight[:, None], 0.0), 0)
    tl.store(out_ptr + row * stride_or + head * DIM + d, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class SplitPlan:
    """How one (rows, span) shape is cut: ``splits`` chunks of ``chunk`` keys (multiple of
    BLOCK_N) each."""

    splits: int
    chunk: int


def plan_splits(rows: int, kv_heads: int, span: int, target_programs: int) -> SplitPlan:
    """Enough chunks for ``target_programs`` programs over ``rows`` x ``kv_heads``, never a chunk
    shorter than BLOCK_N keys nor more than MAX_SPLITS chunks."""
    blocks = max(1, math.ceil(span / BLOCK_N))
    splits = max(1, min(MAX_SPLITS, blocks, math.ceil(target_programs / (rows * kv_heads))))
    chunk = math.ceil(blocks / splits) * BLOCK_N
    return SplitPlan(math.ceil(span / chunk), chunk)


class SplitKVAttention:
    """Decode attention over per-row key counts, with its own static workspace.

    ``__call__(q [rows, H, D], k, v [rows, S, Hkv, D], lengths [rows], span, scale)`` returns
    [rows, H * D] in q's dtype; ``span`` (a bucket, >= every length) fixes the launch shape.
    """

    def __init__(
        self, max_rows: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.heads = heads
        self.dim = dim
        self.precision = "ieee" if dtype == torch.float32 else "tf32"
        self.target_programs = 2 * (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        self.partials = torch.empty(max_rows * heads * MAX_SPLITS, dim, device=device)
        self.lse = torch.empty(max_rows * heads * MAX_SPLITS, device=device)
        self.out = torch.empty(max_rows, heads * dim, dtype=dtype, device=device)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        span: int,
        scale: float,
    ) -> torch.Tensor:
        rows, heads, dim = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        plan = plan_splits(rows, kv_heads, span, self.target_programs)
        out = self.out[:rows]
        _split_kv_attention_chunk[(rows, kv_heads, plan.splits)](
            q, k, v, lengths, out, self.partials, self.lse,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0),
            scale, plan.chunk, span, plan.splits,
            HEADS=heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), DIM=dim,
            BLOCK_N=BLOCK_N, DIRECT=plan.splits == 1, PRECISION=self.precision,
        )  # fmt: skip
        if plan.splits > 1:
            _split_kv_attention_merge[(rows, heads)](
                self.partials, self.lse, out, out.stride(0), plan.splits,
                HEADS=heads, DIM=dim, BLOCK_S=MAX_SPLITS,
            )  # fmt: skip
        return out
