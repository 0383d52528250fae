"""The tiny random Mllama: shaped like the real Llama-3.2-11B-Vision-Instruct, deterministic."""

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, MllamaConfig, MllamaForConditionalGeneration

from worker.model import tiny

EXPECTED_PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_special_token_ids_match_the_real_layout(tiny_model_dir: Path, processor) -> None:
    config = MllamaConfig.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    image_id = ids("<|image|>")

    assert image_id == config.image_token_index == config.text_config.vocab_size
    assert image_id == len(tokenizer) - 1
    assert config.text_config.bos_token_id == tokenizer.bos_token_id == ids("<|begin_of_text|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    eos_ids = [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    assert config.text_config.eos_token_id == eos_ids


def test_generation_config_mirrors_the_instruct_model(tiny_model_dir: Path) -> None:
    model = MllamaForConditionalGeneration.from_pretrained(tiny_model_dir)
    text_config = model.config.text_config
    generation_config = model.generation_config

    assert generation_config.eos_token_id == text_config.eos_token_id
    assert generation_config.pad_token_id == text_config.pad_token_id
    assert generation_config.bos_token_id == text_config.bos_token_id
    assert model.dtype == torch.float32


def test_vision_config_matches_the_processor_tile(tiny_model_dir: Path, processor) -> None:
    vision = MllamaConfig.from_pretrained(tiny_model_dir).vision_config
    image_processor = processor.image_processor

    assert image_processor.size["height"] == image_processor.size["width"] == vision.image_size
    assert vision.image_size == tiny.TILE_SIZE
    assert image_processor.max_image_tiles == vision.max_num_tiles == 4
    assert vision.vision_output_dim == vision.hidden_size * (
        1 + len(vision.intermediate_layers_indices)
    )
    assert list(image_processor.image_mean) == tiny.CLIP_MEAN
    assert list(image_processor.image_std) == tiny.CLIP_STD


def test_cross_attention_gates_are_open(tiny_model_dir: Path) -> None:
    model = MllamaForConditionalGeneration.from_pretrained(tiny_model_dir)
    gates = {
        name: param.item()
        for name, param in model.named_parameters()
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))
    }

    assert len(gates) == 2 * len(model.config.text_config.cross_attention_layers)
    assert set(gates.values()) == {1.0}


def test_chat_template_renders_the_llama_prompt(processor) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert prompt == EXPECTED_PROMPT
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(image_id) == 1
    assert ids[0] == processor.tokenizer.bos_token_id


def test_same_seed_gives_the_same_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = tiny.make_tiny_model(tmp_path / "again")
    other_seed = tiny.make_tiny_model(tmp_path / "other", seed=1)

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    weights = (other_seed / "model.safetensors").read_bytes()
    assert weights != (tiny_model_dir / "model.safetensors").read_bytes()


def test_main_builds_and_prints_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert tiny.main([str(tmp_path / "cli")]) == 0

    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "model.safetensors").is_file()
