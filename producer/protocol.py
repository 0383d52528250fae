"""The wire contract between producer and worker: task name, queue, limits and the request.

Pure: no I/O beyond reading environment variables. The producer validates a request before
sending it and the worker validates it again after receiving it, with the same code.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from producer.config import env_int
from producer.errors import InvalidRequest
from producer.keys import IMAGE_PREFIX

TASK_NAME = "vlmq.analyze"

_IMAGE_KEY = re.compile(re.escape(IMAGE_PREFIX) + r"[0-9a-f]{64}")
_SERVED_MODEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# Text a Llama-3 tokenizer reads as a special token (<|image|>, <|eot_id|>, <|start_header_id|>,
# <|reserved_special_token_7|>, ...): in a question it would add image tokens or chat turns.
_SPECIAL_TOKEN = re.compile(r"<\|[^\s<>|]{1,64}\|>")


def served_model_id(model: str, precision: str) -> str:
    """The name a worker serves ``model`` under: ``<model name>.<precision>``, lowercase.

    ``model`` is a hub id or a local directory; only its last path part is kept, so
    ``/srv/Llama-3.2V-11B-cot`` in bf16 is served as ``llama-3.2v-11b-cot.bf16``.
    """
    name = re.sub(r"[^a-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1].lower())
    return f"{name.strip('.-_') or 'model'}.{precision}"


def model_queue(base_queue: str, served_model: str) -> str:
    """The queue of one served model, e.g. ``vlmq.llama-3.2v-11b-cot.bf16``."""
    return f"{base_queue}.{served_model}"


_TEMPERATURE_MAX = 2.0


@dataclass(frozen=True)
class Limits:
    """Size limits that both sides enforce on every request."""

    max_image_bytes: int = 20 * 1024 * 1024
    #: Width * height, read from the header before decoding: the decompression-bomb guard.
    max_image_pixels: int = 40_000_000
    max_question_chars: int = 4000
    max_new_tokens: int = 2048

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """Read ``VLMQ_MAX_IMAGE_BYTES``, ``VLMQ_MAX_IMAGE_PIXELS``,
        ``VLMQ_MAX_QUESTION_CHARS`` and ``VLMQ_MAX_NEW_TOKENS``; unset ones keep the default.

        Raises:
            ConfigurationError: a variable is set to something other than a positive integer.
        """
        return cls(
            **{f.name: env_int(environ, f"VLMQ_{f.name.upper()}", f.default) for f in fields(cls)}
        )


def _show(value: Any) -> str:
    """A short repr of a possibly hostile value, for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AnalysisRequest:
    """One image-analysis request, as carried in the Celery task's kwargs.

    ``image_key`` is the claim-check key (``vlmq:image:<sha256 hex>``) of the image bytes in
    Redis; ``submitted_at`` is epoch seconds, set by the producer. ``model`` is the served
    model id (:func:`served_model_id`) the request must run on, or None for any.
    """

    image_key: str
    question: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    submitted_at: float = field(default_factory=time.time)
    model: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The JSON-able kwargs of the ``vlmq.analyze`` task: every field, by name."""
        return asdict(self)

    @classmethod
    def from_message(cls, kwargs: Mapping[str, Any], limits: Limits) -> AnalysisRequest:
        """Build and validate a request from received task kwargs.

        Every field is required and no other is allowed.

        Raises:
            InvalidRequest: the message is malformed; the message names the field and what
                is allowed.
        """
        if not isinstance(kwargs, Mapping):
            raise InvalidRequest(f"task kwargs must be a mapping, got {type(kwargs).__name__}")
        expected = [f.name for f in fields(cls)]
        missing = [name for name in expected if name not in kwargs]
        if missing:
            raise InvalidRequest(
                f"missing field(s) {', '.join(missing)}; a request carries {', '.join(expected)}"
            )
        unknown = sorted(map(str, set(kwargs) - set(expected)))
        if unknown:
            raise InvalidRequest(
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(expected)}"
            )
        request = cls(**kwargs)
        request.validate(limits)
        return request

    def validate(self, limits: Limits) -> None:
        """Check every field's type and range against ``limits``.

        Raises:
            InvalidRequest: naming the first wrong field and what is allowed.
        """
        if not isinstance(self.image_key, str) or not _IMAGE_KEY.fullmatch(self.image_key):
            raise InvalidRequest(
                f"image_key must be '{IMAGE_PREFIX}' followed by a lowercase hex sha256 "
                f"(64 characters), got {_show(self.image_key)}"
            )
        if not isinstance(self.question, str):
            raise InvalidRequest(f"question must be a string, got {_show(self.question)}")
        if not self.question.strip():
            raise InvalidRequest("question must contain text, got an empty or blank string")
        if len(self.question) > limits.max_question_chars:
            raise InvalidRequest(
                f"question is {len(self.question)} characters; at most "
                f"{limits.max_question_chars} are allowed (VLMQ_MAX_QUESTION_CHARS)"
            )
        special = _SPECIAL_TOKEN.search(self.question)
        if special:
            raise InvalidRequest(
                f"question contains {special.group()!r}, the text of a special token of the "
                "model (<|...|>), which would be read as an image or chat structure, not as "
                "text; remove it"
            )
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise InvalidRequest(
                f"max_new_tokens must be an integer, got {_show(self.max_new_tokens)}"
            )
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens must be between 1 and {limits.max_new_tokens} "
                f"(VLMQ_MAX_NEW_TOKENS), got {self.max_new_tokens}"
            )
        if not (_is_number(self.temperature) and 0 <= self.temperature <= _TEMPERATURE_MAX):
            raise InvalidRequest(
                f"temperature must be a number from 0 to {_TEMPERATURE_MAX:g} "
                f"(0 = greedy), got {_show(self.temperature)}"
            )
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidRequest(
                f"top_p must be a number greater than 0 and at most 1, got {_show(self.top_p)}"
            )
        if not (
            _is_number(self.submitted_at)
            and math.isfinite(self.submitted_at)
            and self.submitted_at >= 0
        ):
            raise InvalidRequest(
                f"submitted_at must be epoch seconds (a finite number >= 0), "
                f"got {_show(self.submitted_at)}"
            )
        if self.model is not None and not (
            isinstance(self.model, str) and _SERVED_MODEL.fullmatch(self.model)
        ):
            raise InvalidRequest(
                "model must be None or a served model id such as 'llama-3.2v-11b-cot.bf16' "
                f"(lowercase letters, digits, '.', '-', '_'), got {_show(self.model)}"
            )
