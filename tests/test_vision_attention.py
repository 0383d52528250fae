"""The Triton candidate for the vision tower's attention (``bench.vision_attention``) against
what the tower runs: bf16 on a GPU (``VLMQ_TEST_DEVICE=cuda``), or fp16 in Triton's
interpreter on a CPU (``TRITON_INTERPRET=1``, set before anything imports Triton; the
interpreter's bf16 dot is wrong); else skipped."""

from __future__ import annotations

import os

import pytest
import torch
from test_engine_continuous import DEVICE

ON_GPU = torch.device(DEVICE).type == "cuda"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU, or Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from bench.vision_attention import (  # noqa: E402
    CANDIDATE_TILES,
    AttentionTiles,
    tile_attention,
    worker_attention,
)

DTYPE = torch.bfloat16 if ON_GPU else torch.float16
TILES = CANDIDATE_TILES if ON_GPU else (AttentionTiles(32, 16, 1, 1), AttentionTiles(16, 32, 1, 1))


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(
    ("length", "real"),
    # all real; real blocks then a masked tail; a block across `real`; padding blocks
    [(48, 48), (70, 64), (70, 37), (70, 10), (33, 1)],
)
def test_candidate_is_the_towers_attention(tiles, length, real):
    torch.manual_seed(0)
    qkv = torch.randn(2, length, 3 * 2 * 80, dtype=DTYPE, device=DEVICE)
    want = worker_attention(qkv.float(), 2, real)
    got = tile_attention(qkv, 2, real, tiles)
    assert got.shape == want.shape
    assert float((got.float() - want).abs().max()) < 2e-2
