"""The engine's vision tower against HF's padded encoder, on the tiny random Mllama (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from worker.engine import ContinuousEngine
from worker.engine.vision import (
    VisionTower,
    batch_sizes,
    fused_split_attention,
    kernel_wins,
    split_attention,
)
from worker.model.generation import GenerationRequest

# Aspect-ratio ids of the processor's grids for 1..4 tiles (1x1, 1x2, 1x3, 2x2).
RATIO_ID = {1: 1, 2: 2, 3: 3, 4: 6}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    from worker.model.loading import load_model

    return load_model(str(tiny_model_dir), precision="fp32", device="cpu")


def tiles_input(config, tiles: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    v = config.vision_config
    pixels = torch.randn(batch, v.max_num_tiles, 3, v.image_size, v.image_size, generator=gen)
    pixels[:, tiles:] = 0  # the processor's padding tiles
    mask = torch.zeros(batch, v.max_num_tiles, dtype=torch.long)
    mask[:, :tiles] = 1
    return pixels, torch.full((batch,), RATIO_ID[tiles]), mask


def hf_states(vision, pixels, ratios, mask) -> torch.Tensor:
    out = vision(
        pixel_values=pixels[:, None],
        aspect_ratio_ids=ratios[:, None],
        aspect_ratio_mask=mask[:, None],
    )
    hidden = out.last_hidden_state
    return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_split_attention_is_hf_padding_mask():
    """Real queries see every key, padding queries only the real keys: HF's pad-pad mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 4) for _ in range(3))
    real = 6
    pad = torch.arange(10) >= real
    masked = pad[:, None] & pad[None, :]
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=~masked
    )
    got = split_attention(q, k, v, real)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 10, 12))


@pytest.mark.parametrize("tiles", [1, 2, 3, 4])
def test_tower_equals_hf_padded_encoder(loaded, tiles):
    model, _ = loaded
    vision = model.model.vision_model
    tower = VisionTower(vision, skip_padding_tiles=False)
    pixels, ratios, mask = tiles_input(model.config, tiles)
    with torch.inference_mode():
        want = hf_states(vision, pixels, ratios, mask)
        got = tower(pixels, ratios, tiles)
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-5


def test_tower_hands_the_fused_projection_to_the_attention_kernel(loaded):
    """Where the tower keeps the Triton attention, it passes the fused q/k/v output as the
    kernel reads it; a stand-in computing the kernel's function in torch stays HF's."""
    model, _ = loaded
    vision = model.model.vision_model
    tower = VisionTower(vision, skip_padding_tiles=False)
    calls = []

    def stand_in(qkv: torch.Tensor, heads: int, real: int) -> torch.Tensor:
        calls.append(real)
        return fused_split_attention(qkv, heads, real)

    tower._attention = {(tower.shape(t).length, tower.shape(t).real): stand_in for t in (1, 4)}
    for tiles in (1, 2, 4):
        pixels, ratios, mask = tiles_input(model.config, tiles)
        calls.clear()
        with torch.inference_mode():
            want = hf_states(vision, pixels, ratios, mask)
            got = tower(pixels, ratios, tiles)
        assert relative_error(got, want) < 1e-5
        assert len(calls) == (len(tower.layers) if tiles != 2 else 0)


def test_kernel_wins_only_faster_and_in_agreement():
    assert kernel_wins(sdpa_ms=10.0, kernel_ms=9.0, error=1e-3)
    assert not kernel_wins(sdpa_ms=10.0, kernel_ms=9.9, error=1e-3)  # a tie keeps SDPA
    assert not kernel_wins(sdpa_ms=10.0, kernel_ms=5.0, error=0.1)  # fast and wrong


def test_no_attention_choice_off_cuda(loaded):
    model, _ = loaded
    tower = VisionTower(model.model.vision_model, skip_padding_tiles=False)
    assert tower.choose_attention(torch.bfloat16, torch.device("cpu")) == []
    assert tower.kernel_shapes == frozenset()


@pytest.mark.parametrize("tiles", [1, 2, 3, 4])
def test_skipping_padding_tiles(loaded, tiles):
    """Four real tiles: HF's function exactly. Fewer: the real tiles' states move, because
    they no longer attend to padding tiles; on the tiny random model by under 2 %."""
    model, _ = loaded
    vision = model.model.vision_model
    tower = VisionTower(vision, skip_padding_tiles=True)
    pixels, ratios, mask = tiles_input(model.config, tiles, seed=tiles)
    with torch.inference_mode():
        want = hf_states(vision, pixels, ratios, mask)
        got = tower(pixels, ratios, tiles)
    real = tiles * tower.patches
    assert got.shape[1] == real
    error = relative_error(got, want[:, :real])
    assert error < (1e-5 if tiles == 4 else 2e-2)


def test_bf16_tower_within_bf16_tolerance(loaded):
    """In bf16 the tower is as close to HF's fp32 encoder as HF's own bf16 encoder is."""
    model, _ = loaded
    import copy

    vision16 = copy.deepcopy(model.model.vision_model).to(torch.bfloat16)
    tower = VisionTower(copy.deepcopy(vision16), skip_padding_tiles=False)
    for tiles in (1, 4):
        pixels, ratios, mask = tiles_input(model.config, tiles)
        with torch.inference_mode():
            reference = hf_states(model.model.vision_model, pixels, ratios, mask)
            hf_error = relative_error(hf_states(vision16, pixels, ratios, mask), reference)
            error = relative_error(tower(pixels, ratios, tiles), reference)
        assert error < 2 * hf_error + 1e-3, (tiles, error, hf_error)


def test_batch_sizes():
    assert batch_sizes(7) == [4, 2, 1]
    assert batch_sizes(8) == [4, 4]
    assert batch_sizes(0) == []


def noise_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_engine_skipping_padding_tiles(loaded):
    """Four-tile images answer as HF's generate does; smaller ones are answered too."""
    model, processor = loaded
    from worker.engine.inputs import prompt_text

    engine = ContinuousEngine(
        model, processor, max_slots=4, max_seq_len=128, skip_padding_tiles=True
    )
    four = GenerationRequest(noise_image(1, (112, 112)), "Describe this image.", 12)
    small = GenerationRequest(noise_image(2, (40, 30)), "What is it?", 6)
    engine.submit("four", four)
    engine.submit("small", small)
    results = {}
    while engine.has_work():
        results.update({done.key: done for done in engine.step_outputs()})
    inputs = processor(
        images=[[four.image]],
        text=[prompt_text(processor, four.question)],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert int(inputs["aspect_ratio_mask"].sum()) == 4
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=four.max_new_tokens, eos_token_id=eos,
            pad_token_id=model.generation_config.pad_token_id,
        )  # fmt: skip
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    got = results["four"].token_ids
    assert got == want[: len(got)] and (len(got) == len(want) or got[-1] in eos)
    assert results["small"].error is None and len(results["small"].token_ids) >= 1
