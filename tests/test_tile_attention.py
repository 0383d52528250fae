"""The vision tower's Triton attention (``worker.engine.tile_attention``) against its SDPA
path: bf16 on a GPU (``VLMQ_TEST_DEVICE=cuda``: the worker's tiles and the bench's
candidates), or fp16 in Triton's interpreter on a CPU (``TRITON_INTERPRET=1``, set before
anything imports Triton; the interpreter's bf16 dot is wrong); else skipped."""

from __future__ import annotations

import os

import pytest
import torch
from test_engine_continuous import DEVICE

from worker.engine.vision import fused_split_attention

ON_GPU = torch.device(DEVICE).type == "cuda"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU, or Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from bench.vision_attention import CANDIDATE_TILES  # noqa: E402
from worker.engine.tile_attention import AttentionTiles, tile_attention  # noqa: E402

DTYPE = torch.bfloat16 if ON_GPU else torch.float16
TILES = CANDIDATE_TILES if ON_GPU else (AttentionTiles(32, 16, 1, 1), AttentionTiles(16, 32, 1, 1))


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(
    ("length", "real"),
    # all real; real blocks then a masked tail; a block across `real`; padding blocks
    [(48, 48), (70, 64), (70, 37), (70, 10), (33, 1)],
)
def test_kernel_is_the_towers_attention(tiles, length, real):
    torch.manual_seed(0)
    qkv = torch.randn(2, length, 3 * 2 * 80, dtype=DTYPE, device=DEVICE)
    want = fused_split_attention(qkv.float(), 2, real)
    got = tile_attention(qkv, 2, real, tiles)
    assert got.shape == want.shape
    assert float((got.float() - want).abs().max()) < 2e-2


def test_tower_keeps_the_kernel_where_it_wins(monkeypatch):
    """The tower's start-up choice on a small encoder of 80-channel heads: every shape it
    runs is checked against SDPA and timed (here: the kernel always twice as fast), and the
    tower with the kernel kept gives SDPA's states."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    from worker.engine import vision

    config = MllamaVisionConfig(
        hidden_size=160, attention_heads=2, intermediate_size=320, num_hidden_layers=2,
        num_global_layers=1, image_size=28, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=[0], vision_output_dim=320,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MllamaVisionModel(config).to(DEVICE, DTYPE).eval()
    tower = vision.VisionTower(model, skip_padding_tiles=False)
    times = iter([2.0, 1.0] * config.max_num_tiles)  # SDPA, then the kernel, per shape
    monkeypatch.setattr(vision, "median_cuda_ms", lambda fn, reps: next(times))
    pixels = torch.randn(2, 4, 3, 28, 28, device=DEVICE, dtype=DTYPE)
    ratios = torch.full((2,), 6, device=DEVICE)
    with torch.inference_mode():
        want = tower(pixels, ratios, 4)
        timings = tower._keep_kernel_where_faster(tile_attention, DTYPE, torch.device(DEVICE))
        got = tower(pixels, ratios, 4)
    assert [t["tiles"] for t in timings] == [1, 2, 3, 4]
    assert all(t["error"] < 2e-2 for t in timings)
    assert len(tower.kernel_shapes) == 4
    assert float((got.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2
