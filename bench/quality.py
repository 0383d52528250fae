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
from worker.model.loading import BNB_SKIP_MODULES

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


def quantize_nf4(model: nn.Module, blocksize: int = 64) -> int:
    """Replace every ``nn.Linear`` outside the modules ``load_model`` leaves unquantized by a
    bitsandbytes NF4 ``Linear4bit`` of its weight (no double quantisation, as ``load_model``
    loads it), in place; returns how many."""
    import bitsandbytes as bnb

    skip = tuple(BNB_SKIP_MODULES)
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not name.startswith(skip)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        weight = linear.weight.data
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type="nf4",
            blocksize=blocksize,
            compress_statistics=False,
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, quantized.to(weight.device))  # quantises
    return len(targets)
