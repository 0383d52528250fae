"""What a model path is asked and answers, shared by the reference runner and the engine (no
torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    """One question about one image, with its own generation options."""

    image: Image.Image  # already RGB, validated
    question: str
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    """The answer to one request."""

    text: str  # decoded answer, special tokens skipped, stripped
    prompt_tokens: int  # this row's real prompt tokens (no padding)
    answer_tokens: int  # generated up to and including its EOS, or its own limit


def warmup_request() -> GenerationRequest:
    """A small request on a synthetic image, to warm a model path up before real work."""
    image = Image.new("RGB", (64, 48), color=(128, 64, 32))
    return GenerationRequest(image=image, question="What is in this image?", max_new_tokens=2)
