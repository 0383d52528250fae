"""The one way vlmq loads an Mllama model and its processor, real weights and tiny model alike."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    MllamaForConditionalGeneration,
    ProcessorMixin,
)

from producer.errors import ConfigurationError
from worker.model.fp8 import SKIP_MODULES, check_fp8_device, quantize_language_model
from worker.settings import DTYPE_PRECISIONS, check_precision

DTYPES = dict(zip(DTYPE_PRECISIONS, (torch.bfloat16, torch.float16, torch.float32), strict=True))

# Quantize the language model only; the vision tower and projector stay in bf16.
# Patterns match from the start of the module path, and a custom list drops bnb's default
# `lm_head` skip, hence it is listed again.
BNB_SKIP_MODULES = list(SKIP_MODULES)


def _is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_settings(precision: str, attn_implementation: str, device: str) -> None:
    check_precision(precision, "precision")
    if attn_implementation == "flash_attention_2" and not _is_installed("flash_attn"):
        raise ConfigurationError(
            "attn_implementation 'flash_attention_2' needs the flash-attn package, which is not "
            "installed: install it (pip install 'vlmq[flash]') or use 'sdpa'."
        )
    try:
        on_cuda = torch.device(device).type == "cuda"
    except RuntimeError as exc:
        raise ConfigurationError(
            f"Unknown device {device!r}: use 'cuda', 'cuda:N' or 'cpu'."
        ) from exc
    if on_cuda and not torch.cuda.is_available():
        raise ConfigurationError(
            f"Device {device!r} was asked for but CUDA is not available here: "
            "run on a machine with a GPU, or set the device to 'cpu'."
        )
    if precision == "fp8":
        check_fp8_device(device)
    if precision == "nf4":
        if not on_cuda:
            raise ConfigurationError(
                f"Precision {precision!r} (bitsandbytes) needs a CUDA device, got {device!r}: "
                "set a CUDA device or use precision 'bf16', 'fp16' or 'fp32'."
            )
        if not _is_installed("bitsandbytes"):
            raise ConfigurationError(
                f"Precision {precision!r} needs the bitsandbytes package, which is not installed: "
                "install it (pip install bitsandbytes) or use precision 'bf16'."
            )


# A Hugging Face hub id: "name" or "owner/name", without path syntax.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _check_model_path(model_id: str) -> None:
    """A model named by a path must be an existing directory; a hub id is left to the hub."""
    path = Path(model_id).expanduser()
    if path.exists() or _HUB_ID.fullmatch(model_id):
        if path.exists() and not path.is_dir():
            raise ConfigurationError(f"the model path {model_id!r} is not a directory")
        return
    raise ConfigurationError(
        f"the model directory {model_id!r} does not exist; set VLMQ_MODEL to a local model "
        "directory or a hub id such as meta-llama/Llama-3.2-11B-Vision-Instruct"
    )


def _quantization_config() -> BitsAndBytesConfig:
    """nf4, the one quantized precision. ``llm_int8_skip_modules`` is bitsandbytes' name for
    the modules left unquantized, whatever the precision."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        # The engine fuses NF4 Linears by concatenating one fp32 absmax per block, not nested ones.
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=BNB_SKIP_MODULES,
    )


def load_model(
    model_id: str,
    *,
    precision: str = "bf16",
    attn_implementation: str = "sdpa",
    device: str = "cuda",
) -> tuple[MllamaForConditionalGeneration, ProcessorMixin]:
    """Load an Mllama model (local directory or hub id) and its processor, ready for inference.

    ``precision`` is one of bf16, fp16, fp32 (weights in that dtype), nf4 (the language model
    quantized by bitsandbytes, the rest in bf16; CUDA only) or fp8 (loaded in bf16, then the
    language model's Linears quantized to e4m3 by :mod:`worker.model.fp8`; fp8 GPUs only).
    The model is put on ``device`` in eval mode; the processor pads on the left, as batched
    generation needs.
    Raises ConfigurationError, saying how to fix it, for settings that cannot work here.
    """
    _check_settings(precision, attn_implementation, device)
    _check_model_path(model_id)
    if precision == "nf4":
        model = MllamaForConditionalGeneration.from_pretrained(
            model_id,
            dtype=torch.bfloat16,
            attn_implementation=attn_implementation,
            quantization_config=_quantization_config(),
            device_map={"": device},
        )
    else:
        dtype = torch.bfloat16 if precision == "fp8" else DTYPES[precision]
        model = MllamaForConditionalGeneration.from_pretrained(
            model_id, dtype=dtype, attn_implementation=attn_implementation
        ).to(device)
        if precision == "fp8":
            quantize_language_model(model)
    model.eval()

    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"
    return model, processor
