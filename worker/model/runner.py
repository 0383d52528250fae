"""Batched generation for Mllama over plain transformers ``generate``, apart from any queueing.

One ``generate`` call serves a whole batch even when its requests differ in temperature, top-p
and max_new_tokens: sampling is applied row by row by a logits processor (greedy rows keep only
their argmax), and a stopping criterion ends each row at its own limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    BatchFeature,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    ProcessorMixin,
    StoppingCriteria,
    StoppingCriteriaList,
)

from worker.engine.sampling import top_p_filter
from worker.model.generation import Generation, GenerationRequest, warmup_request


@dataclass(frozen=True)
class PreparedBatch:
    """Model inputs built on the CPU for a list of requests, in their order."""

    inputs: BatchFeature
    requests: tuple[GenerationRequest, ...]


class PerRowSampling(LogitsProcessor):
    """Applies each row's temperature and top-p; rows with temperature 0 keep only their argmax.

    Greedy rows then sample from a one-hot distribution, so one sampling ``generate`` picks
    exactly the token plain greedy decoding would.
    """

    def __init__(self, temperatures: torch.Tensor, top_ps: torch.Tensor):
        self.greedy = temperatures == 0
        self.temperatures = torch.where(self.greedy, 1.0, temperatures)[:, None]
        self.top_ps = torch.where(self.greedy, 1.0, top_ps)
        # Decided once here, as a Python bool, to keep a device sync out of every step.
        self.any_top_p = bool((self.top_ps < 1.0).any())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        argmax = scores.argmax(dim=-1, keepdim=True)
        scores = scores / self.temperatures
        if self.any_top_p:
            scores = top_p_filter(scores, self.top_ps)
        not_argmax = torch.ones_like(scores, dtype=torch.bool).scatter_(1, argmax, False)
        return scores.masked_fill(self.greedy[:, None] & not_argmax, -float("inf"))


class PerRowMaxNewTokens(StoppingCriteria):
    """Ends each row once it has generated its own ``max_new_tokens``."""

    def __init__(self, prompt_length: int, max_new_tokens: torch.Tensor):
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_length) >= self.max_new_tokens


class MllamaRunner:
    """Runs batches of image questions through an Mllama model and its processor."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        generation_config = model.generation_config
        eos = generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = generation_config.pad_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if pad is None else pad

    def _prompt(self, question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def prepare(self, requests: Sequence[GenerationRequest]) -> PreparedBatch:
        """Build the model inputs for ``requests`` on the CPU, left-padded to one length."""
        if not requests:
            raise ValueError("prepare() needs at least one request")
        inputs = self.processor(
            images=[[request.image] for request in requests],
            text=[self._prompt(request.question) for request in requests],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        return PreparedBatch(inputs=inputs, requests=tuple(requests))

    def generate(self, batch: PreparedBatch) -> list[Generation]:
        """Run one ``generate`` over the batch; one Generation per request, in order."""
        device = self.model.device
        inputs = batch.inputs.to(device)
        requests = batch.requests
        prompt_length = inputs["input_ids"].shape[1]
        limits = [request.max_new_tokens for request in requests]
        stopping = PerRowMaxNewTokens(prompt_length, torch.tensor(limits, device=device))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                **self._decoding_options(requests, device),
                max_new_tokens=max(limits),
                stopping_criteria=StoppingCriteriaList([stopping]),
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
            )

        answers = output[:, prompt_length:].tolist()
        lengths = [
            self._answer_length(answer, limit)
            for answer, limit in zip(answers, limits, strict=True)
        ]
        texts = self.tokenizer.batch_decode(
            [answer[:length] for answer, length in zip(answers, lengths, strict=True)],
            skip_special_tokens=True,
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Generation(text=text.strip(), prompt_tokens=prompt, answer_tokens=length)
            for text, prompt, length in zip(texts, prompt_tokens, lengths, strict=True)
        ]

    @staticmethod
    def _decoding_options(
        requests: Sequence[GenerationRequest], device: torch.device
    ) -> dict[str, object]:
        if all(request.temperature == 0 for request in requests):
            return {"do_sample": False}
        temperatures = torch.tensor([r.temperature for r in requests], device=device)
        top_ps = torch.tensor([r.top_p for r in requests], device=device)
        return {
            "do_sample": True,
            # Neutral values, so the checkpoint's own sampling defaults stay out of the way.
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "logits_processor": LogitsProcessorList([PerRowSampling(temperatures, top_ps)]),
        }

    def _answer_length(self, answer: list[int], limit: int) -> int:
        answer = answer[:limit]
        for index, token in enumerate(answer):
            if token in self.eos_token_ids:
                return index + 1
        return len(answer)

    def warmup(self) -> None:
        """Run one small generate on a synthetic image, so the first real batch is not slow."""
        self.generate(self.prepare([warmup_request()]))
