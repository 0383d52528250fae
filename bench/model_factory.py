"""The benchmark's models: the full-size Llama-3.2-11B-Vision architecture with random weights,
a "mini" model with the same tokenizer, tile and vocabulary but tiny layers (to check the 11B
path on a CPU), and the project's tiny test model.

Every bench model names ``<|image|>`` (an id outside ``lm_head``) as its only end-of-sequence
token, so no answer can stop early: each request generates exactly its ``max_new_tokens``, and
random weights cost what real ones do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)

from bench import workload
from bench.progress import log
from worker.model.tiny import (
    BOS,
    CHAT_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    CORPUS,
    EOT,
    IMAGE,
    PAD,
    llama3_tokenizer,
    make_tiny_model,
)

MODEL_KINDS = ("11b", "mini", "tiny")
TILE_SIZES = {"11b": 560, "mini": 560, "tiny": 56}
MARKER = "bench_model.json"

# Llama 3's layout: 128000 BPE ids, then 256 special ids, then <|image|> = 128256.
BPE_VOCAB = 128000
_NAMED_SPECIALS = {
    128000: BOS,
    128001: "<|end_of_text|>",
    128004: PAD,
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: EOT,
    128010: "<|python_tag|>",
}
TEXT_VOCAB = 128256
REAL_EOS = [128001, 128008, 128009]

_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3 in id order (128000 .. 128255)."""
    out, reserved = [], 0
    for token_id in range(BPE_VOCAB, TEXT_VOCAB):
        name = _NAMED_SPECIALS.get(token_id)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        out.append(name)
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama 3's id layout, built offline in about a second.

    Its merges are learnt from the bench's own questions, so a question costs about as many
    tokens as with the real tokenizer; the rest of the 128000 BPE ids are unreachable fillers
    that still decode to text.
    """
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [*CORPUS, *workload._ASKS, *workload._CONTEXT]
    trainer_tok.train_from_iterator(
        corpus * 4,
        trainer=trainers.BpeTrainer(
            vocab_size=4000,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    learnt = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(learnt["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    next_id = len(vocab)
    filler = 0
    while next_id < BPE_VOCAB:
        token = f"<{filler}>"
        filler += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in [*special_tokens(), IMAGE]])
    if tokenizer.token_to_id(IMAGE) != TEXT_VOCAB or tokenizer.token_to_id(BOS) != BPE_VOCAB:
        raise RuntimeError("bench tokenizer: special token ids do not follow Llama 3's layout")
    return llama3_tokenizer(tokenizer)


def build_processor(tile_size: int = 560) -> MllamaProcessor:
    """The Mllama processor with the real tile (560), 4 tiles, CLIP normalisation."""
    image_processor = MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=4,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE
    )
    processor.tokenizer.padding_side = "left"
    return processor


def build_config(kind: str = "11b") -> MllamaConfig:
    """The Llama-3.2-11B-Vision config (``11b``), or the same vocabulary and tile with tiny
    layers (``mini``)."""
    text = {
        "vocab_size": TEXT_VOCAB,
        "rope_parameters": dict(_ROPE),
        "max_position_embeddings": 131072,
        "bos_token_id": BPE_VOCAB,
        "eos_token_id": list(REAL_EOS),
        "pad_token_id": 128004,
        "tie_word_embeddings": False,
    }
    vision = {"image_size": 560, "patch_size": 14, "max_num_tiles": 4}
    if kind == "11b":
        text |= {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 40,
            "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
        }
        vision |= {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_global_layers": 8,
            "attention_heads": 16,
            "intermediate_layers_indices": [3, 7, 15, 23, 30],
            "vision_output_dim": 7680,
        }
    elif kind == "mini":
        text |= {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "cross_attention_layers": [1, 3],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_layers_indices": [0, 1],
            "vision_output_dim": 96,
        }
    else:
        raise ValueError(f"unknown model kind {kind!r}; use 11b or mini")
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=TEXT_VOCAB)


def forced_length_generation_config(config: MllamaConfig) -> GenerationConfig:
    """Greedy, and ``<|image|>`` (never a logit of ``lm_head``) as the only EOS: every answer
    runs to its ``max_new_tokens``."""
    text = config.get_text_config()
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[config.image_token_index],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )


def open_gates(model: torch.nn.Module, value: float = 1.0) -> int:
    """Set every cross-attention gate (zero at random init) so images change the output."""
    n = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(value)
                n += 1
    return n


def build_random_model(
    config: MllamaConfig, *, device: str, dtype: torch.dtype, seed: int = 0
) -> MllamaForConditionalGeneration:
    """Random weights built directly on ``device`` in ``dtype`` (the 11B takes seconds on a
    GPU, not minutes on a CPU), gates opened, forced-length generation config."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    model.to(device)  # a no-op unless some buffer was made on the CPU
    model.eval()
    open_gates(model)
    model.generation_config = forced_length_generation_config(model.config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters as stored (bitsandbytes packs two 4-bit values in a byte: see the bytes)."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights: all, and those one decode step reads (language model + lm_head,
    not the vision tower, projector or the embedding table, of which it reads only a row).
    Quantized weights count their bitsandbytes scales too, which are not parameters."""
    total, decode = 0, 0
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        for scale in quantisation_scales(tensor):
            if id(scale) not in seen:
                seen.add(id(scale))
                size += scale.numel() * scale.element_size()
        total += size
        if "vision_model" in name or "multi_modal_projector" in name or "embed_tokens" in name:
            continue
        if "language_model" in name or name.startswith("lm_head"):
            decode += size
    return {"total": total, "decode": decode}


def quantisation_scales(weight: torch.Tensor) -> list[torch.Tensor]:
    """The scales bitsandbytes keeps beside an nf4 weight: its ``quant_state`` (absmax per
    block, and its own quantized state when nested)."""
    found = []
    state = getattr(weight, "quant_state", None)
    while state is not None:
        found += [getattr(state, "absmax", None), getattr(state, "code", None)]
        state = getattr(state, "state2", None)
    return [t for t in found if isinstance(t, torch.Tensor)]


def cache_bytes(config: MllamaConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """KV-cache bytes: per text token (self-attention layers) and per image (cross layers,
    stored by transformers for ``max_num_tiles`` tiles whatever the image's own count)."""
    text = config.get_text_config()
    vision = config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_layer_token = 2 * text.num_key_value_heads * head_dim * dtype_bytes
    cross_layers = len(text.cross_attention_layers)
    self_layers = text.num_hidden_layers - cross_layers
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return {
        "self_per_token": self_layers * per_layer_token,
        "cross_per_image": cross_layers * per_layer_token * vision.max_num_tiles * patches,
    }


def save_bench_model(
    model: MllamaForConditionalGeneration, processor: MllamaProcessor, path: Path, kind: str
) -> float:
    """Save model and processor for ``from_pretrained``; returns the seconds it took."""
    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    processor.save_pretrained(path)
    seconds = time.perf_counter() - t0
    (path / MARKER).write_text(json.dumps({"kind": kind, "saved_s": seconds}))
    return seconds


def saved_kind(path: Path) -> str | None:
    """The kind of a complete bench model already saved at ``path``, or None."""
    try:
        return json.loads((path / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError):
        return None


def prepare_tiny(path: Path) -> Path:
    """The project's tiny model saved at ``path``, with the forced-length generation config."""
    make_tiny_model(path)
    config = MllamaConfig.from_pretrained(path)
    forced_length_generation_config(config).save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"kind": "tiny"}))
    return path


def describe_saved(path: Path) -> dict:
    """Parameters, weight and cache bytes of a saved bench model, from its config alone."""
    config = MllamaConfig.from_pretrained(path)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    wb = weight_bytes(model)
    return {
        "parameters": count_parameters(model),
        "weight_bytes": wb["total"],
        "decode_weight_bytes": wb["decode"],
        "cache": cache_bytes(config),
        "architecture": describe(config),
    }


def describe(config: MllamaConfig) -> str:
    """One line about the architecture."""
    text, vision = config.get_text_config(), config.vision_config
    return (
        f"text {text.num_hidden_layers} layers x {text.hidden_size} "
        f"(cross {list(text.cross_attention_layers)}), vocab {text.vocab_size}; vision "
        f"{vision.num_hidden_layers}+{vision.num_global_layers} layers x {vision.hidden_size}, "
        f"tile {vision.image_size}, {vision.max_num_tiles} tiles; <|image|> "
        f"{config.image_token_index}"
    )


def log_model(model: torch.nn.Module, label: str) -> None:
    """Log a model's parameter count and weight bytes."""
    wb = weight_bytes(model)
    log(
        f"{label}: {count_parameters(model) / 1e9:.3f}B parameters, weights "
        f"{wb['total'] / 1e9:.2f} GB ({wb['decode'] / 1e9:.2f} GB read per decode step)"
    )
