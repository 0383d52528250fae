"""The split-KV decode attention kernel against SDPA with a mask, per-row key counts.

Needs Triton: on a CUDA host it runs there (bf16 too); elsewhere with ``TRITON_INTERPRET=1``
(set before anything imports Triton) in Triton's interpreter, which needs numpy < 2.4 for
kernels whose loop bounds are loaded values. CI's CPU torch has no Triton: the GPU check covers
it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from worker.engine.attention import gqa_attention

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA, and TRITON_INTERPRET=1 is not set", allow_module_level=True)
pytest.importorskip("triton")

from worker.engine.split_kv import BLOCK_N, MAX_SPLITS, SplitKVAttention, plan_splits  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(q, k, v, lengths, scale):
    keys = torch.arange(k.shape[1], device=k.device)
    mask = (keys[None, :] < lengths[:, None])[:, None, :]
    as_float = [t.float() for t in (q[:, :, None], k.transpose(1, 2), v.transpose(1, 2))]
    return gqa_attention(*as_float, mask, scale)[:, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "span", "target"),
    [(4, 2, 16, 300, 1), (8, 2, 32, 200, 64), (8, 8, 16, 1601, 512)],
)
def test_matches_masked_sdpa(dtype, heads, kv_heads, dim, span, target):
    torch.manual_seed(span)
    rows, stored = 3, span + 40  # the cache holds more positions than the span reads
    attention = SplitKVAttention(4, heads, dim, DEVICE, dtype)
    attention.target_programs = target
    q = torch.randn(rows, heads, dim, dtype=dtype, device=DEVICE)
    k = torch.randn(rows, stored, kv_heads, dim, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    # A full row, a short one, and a parked one whose count passes the span (read up to it).
    lengths = torch.tensor([span, 1 + span // 7, stored], device=DEVICE)
    out = attention(q, k, v, lengths, span, 1 / math.sqrt(dim))
    expected = reference(q, k, v, lengths.clamp(max=span), 1 / math.sqrt(dim))
    assert out.shape == (rows, heads * dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_plan_covers_the_span_in_whole_blocks():
    for rows in (1, 2, 8, 64):
        for span in (1, 63, 64, 256, 4096, 6404):
            plan = plan_splits(rows, 8, span, 264)
            assert plan.chunk % BLOCK_N == 0 and 1 <= plan.splits <= MAX_SPLITS
            assert (plan.splits - 1) * plan.chunk < span <= plan.splits * plan.chunk
    assert plan_splits(64, 8, 4096, 264).splits == 1  # enough programs without splitting
    assert plan_splits(1, 8, 4096, 264).splits == MAX_SPLITS
