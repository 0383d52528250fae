"""A tiny random Mllama built fully offline, shaped like Llama-3.2-11B-Vision-Instruct.

It has the real model's special tokens (``<|image|>`` last, so its id equals the text vocab
size), its chat template output, its tiling image processor (with a 56-pixel tile) and its
generation config, so the real loading and batching code runs on it unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

TILE_SIZE = 56
PATCH_SIZE = 14
MAX_IMAGE_TILES = 4
BPE_VOCAB_SIZE = 640

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
SPECIAL_TOKENS = [
    BOS,
    END_OF_TEXT,
    PAD,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOM,
    EOT,
    "<|python_tag|>",
]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llama-3.2-Vision's template reduced to what it renders for plain user/assistant/system turns.
# For one user message holding an image then text, with add_generation_prompt, it gives
# "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>"
# "<|start_header_id|>assistant<|end_header_id|>\n\n", exactly as the real template does.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}"
    "{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}"
    "{{- content['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = [
    "Describe this image in one sentence.",
    "What is shown in the picture? Answer briefly.",
    "How many people are in this photo, and what are they doing?",
    "The image shows a red car parked on a quiet street next to a green tree.",
    "A small brown dog is running across the grass in a sunny park.",
    "There are three apples and two bananas on a white wooden table.",
    "The chart compares monthly sales for the first six months of the year.",
    "In the background there is a tall building with many glass windows.",
    "A woman in a blue jacket is reading a book on a bench near the river.",
    "The sign says the store opens at nine in the morning and closes at six.",
    "Two children are playing football on a field while their parents watch.",
    "The photo was taken at night; the city lights reflect on the water.",
    "What color is the bird sitting on the branch? The bird is yellow and black.",
    "Read the text in the image and summarize it for me, please.",
    "The document is an invoice with a total amount of 1,240 dollars.",
    "A plate of pasta with tomato sauce, cheese and fresh basil leaves.",
    "Is there a cat in the image? Yes, a grey cat is sleeping on the sofa.",
    "The mountains are covered in snow and the sky above them is clear.",
    "Count the objects: there are seven blue circles and four red squares.",
    "The man is holding a phone and smiling at the camera.",
    "The user asks a question about the image and the assistant answers it.",
    "<SUMMARY>I will describe the scene.</SUMMARY><CAPTION>A kitchen.</CAPTION>",
    "<REASONING>The table holds fruit, so the answer is fruit.</REASONING>",
    "<CONCLUSION>The answer is 42.</CONCLUSION>",
    "def main(): return 0  # code, numbers 0123456789 and symbols: {}[]()<>=+-*/",
]


def _build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    # Appended after the BPE vocab, like the real model's added tokens; <|image|> must come last.
    tokenizer.add_special_tokens([*SPECIAL_TOKENS, IMAGE])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return llama3_tokenizer(tokenizer)


def llama3_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` as transformers' fast tokenizer with Llama 3's begin-of-text, end-of-turn
    and pad tokens and Llama 3.2 Vision's chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
    )


def _build_config(tokenizer: PreTrainedTokenizerFast) -> MllamaConfig:
    token_id = tokenizer.convert_tokens_to_ids
    image_token_id = token_id(IMAGE)
    intermediate_layers = [1, 3]
    vision_hidden = 32
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "attention_heads": 4,
        "image_size": TILE_SIZE,
        "patch_size": PATCH_SIZE,
        "max_num_tiles": MAX_IMAGE_TILES,
        "intermediate_layers_indices": intermediate_layers,
        "vision_output_dim": vision_hidden * (1 + len(intermediate_layers)),
    }
    text_config = {
        "vocab_size": image_token_id,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "cross_attention_layers": [1, 3],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": token_id(BOS),
        "eos_token_id": [token_id(END_OF_TEXT), token_id(EOM), token_id(EOT)],
        "pad_token_id": token_id(PAD),
    }
    return MllamaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
    )


def _open_cross_attention_gates(model: MllamaForConditionalGeneration) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)


def make_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Mllama with its processor, save both into ``path`` and return it.

    Deterministic for a given ``seed``; fp32 safetensors; no network access.
    """
    path = Path(path)
    tokenizer = _build_tokenizer()
    image_processor = MllamaImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=MAX_IMAGE_TILES,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    config = _build_config(tokenizer)
    text_config = config.text_config

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).to(torch.float32).eval()
    _open_cross_attention_gates(model)
    # The same values as the real Instruct model's generation_config.json.
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m worker.model.tiny DIR [--seed N]``; prints the model directory."""
    parser = argparse.ArgumentParser(description="Build a tiny random Mllama for tests.")
    parser.add_argument("path", type=Path, help="directory to save the model and processor into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_model(args.path, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
