"""Quality of a quantized precision against the weights it was quantized from.

The model greedily decodes ``steps`` tokens for an image question in its own dtype; then it
scores that sequence in one forward before and after ``quantize`` (in place): the relative
error of the logits and top-1 agreement at each decode step. Used by ``bench.fp8_check`` and
``bench.nf4_check`` on the random 11B.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from worker.engine.inputs import prompt_text
from worker.model.fp8 import replace_linears

QUESTION = "Describe this image in detail."


def noise_image(seed: int, size: int = 560) -> Image.Image:
    """A reproducible random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def agreement(
    model: nn.Module,
    processor,
    quantize: Callable[[nn.Module], object],
    *,
    steps: int,
    image: Image.Image,
) -> dict[str, float]:
    """Logits after ``quantize(model)`` against before, teacher-forced on the greedy tokens the
    model decoded before it (``model`` is quantized when this returns)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    inputs = processor(
        images=[[image]],
        text=[prompt_text(processor, QUESTION)],
        add_special_tokens=False,
        return_tensors="pt",
    ).to(device)
    prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        mask = inputs["cross_attention_mask"]
        full = {
            **inputs,
            "input_ids": tokens,
            "attention_mask": torch.ones_like(tokens),
            # Generated tokens see the image as the prompt's last token does (HF's rule).
            "cross_attention_mask": torch.cat(
                [mask, mask[:, -1:].expand(-1, tokens.shape[1] - prompt, -1, -1)], dim=1
            ),
        }
        # Position p's logits predict token p + 1: the decode steps are prompt - 1 .. end - 1.
        span = slice(prompt - 1, tokens.shape[1] - 1)
        before = model(**full).logits[0, span].float()
        quantize(model)
        after = model(**full).logits[0, span].float()
    rel = ((after - before).norm(dim=-1) / before.norm(dim=-1)).cpu()
    return {
        "steps": before.shape[0],
        "prompt_tokens": prompt,
        "rel_logits_err_mean": rel.mean().item(),
        "rel_logits_err_max": rel.max().item(),
        "top1_agreement": (after.argmax(-1) == before.argmax(-1)).float().mean().item(),
        "seconds": time.perf_counter() - t0,
    }


def nf4_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    blocksize: int = 64,
    nested: bool = False,
) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` of ``weight`` on its device (quantised there), computing
    in its dtype; ``nested``: double quantisation (``load_model`` uses none)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    linear = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=weight.dtype,
        quant_type="nf4",
    )  # fmt: skip
    linear.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", blocksize=blocksize,
        compress_statistics=nested,
    )  # fmt: skip
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear.to(weight.device)  # quantises


def quantize_nf4(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` outside the modules ``load_model`` leaves unquantized by a
    bitsandbytes NF4 ``Linear4bit`` of its weight, in place; returns how many."""

    def convert(linear: nn.Linear) -> nn.Module:
        return nf4_linear(linear.weight.data, None if linear.bias is None else linear.bias.data)

    return len(replace_linears(model, convert))
