"""CPU preprocessing of one request: prompt tokens, tiles and cross-attention rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import ProcessorMixin

from worker.model.generation import GenerationRequest


@dataclass(frozen=True)
class PreparedRequest:
    """One request as the processor shapes it, unpadded (batch and image dims dropped)."""

    input_ids: list[int]
    cross_rows: torch.Tensor  # [prompt, max_tiles] 0/1: the tiles each prompt token sees
    pixel_values: torch.Tensor  # [max_tiles, 3, H, W]
    aspect_ratio_id: int
    aspect_ratio_mask: torch.Tensor  # [max_tiles]
    image_key: str  # content hash of the image: requests with equal keys share cross K/V

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without blocking the calling thread: a blocking copy would wait
    for every kernel queued on the stream, decode steps and image encoding included."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def image_key(image: object) -> str:
    """A hash of the image's pixels, mode and size."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def prompt_text(processor: ProcessorMixin, question: str) -> str:
    """The chat-template prompt vlmq sends for one image and one question."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_request(processor: ProcessorMixin, request: GenerationRequest) -> PreparedRequest:
    """Run the processor on one request, exactly as the batch runner does for a batch of one."""
    inputs = processor(
        images=[[request.image]],
        text=[prompt_text(processor, request.question)],
        add_special_tokens=False,
        return_tensors="pt",
    )
    cross = inputs["cross_attention_mask"]
    if cross.shape[2] != 1:
        raise ValueError(f"expected one image per prompt, got {cross.shape[2]}")
    return PreparedRequest(
        input_ids=inputs["input_ids"][0].tolist(),
        cross_rows=cross[0, :, 0].to(torch.bool),
        pixel_values=inputs["pixel_values"][0, 0],
        aspect_ratio_id=int(inputs["aspect_ratio_ids"][0, 0]),
        aspect_ratio_mask=inputs["aspect_ratio_mask"][0, 0],
        image_key=image_key(request.image),
    )
