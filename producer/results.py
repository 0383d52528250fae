"""What a finished task returns: the answer, its LLaVA-CoT stages, token counts and timings.

The worker stores :meth:`AnalysisResult.to_dict` (the same as ``dataclasses.asdict`` without
``task_id``) as the Celery result::

    {"answer": str,
     "stages": {"summary", "caption", "reasoning", "conclusion"} | None,
     "prompt_tokens": int, "answer_tokens": int,
     "timings": {"queued_ms": float, "batch_size": int, "gpu_ms": float},
     "model": str}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from producer.errors import VlmqError


@dataclass(frozen=True)
class CotStages:
    """The four stages of a LLaVA-CoT answer; a stage the model did not write is None."""

    summary: str | None
    caption: str | None
    reasoning: str | None
    conclusion: str | None


_STAGES = tuple(f.name for f in fields(CotStages))
_OPENING = re.compile(r"<\s*(" + "|".join(_STAGES) + r")\s*>", re.IGNORECASE)


def parse_cot(text: str) -> CotStages | None:
    """Split a LLaVA-CoT answer ``<SUMMARY>…</SUMMARY><CAPTION>…</CAPTION>…`` into stages.

    Tags match in any case and with blanks inside the brackets. A stage without its closing
    tag (e.g. output cut at ``max_new_tokens``) runs to the next opening tag or the end. A
    stage that appears twice keeps its first text; an empty stage is None. Returns None when
    the text has no stage tag at all.
    """
    openings = list(_OPENING.finditer(text))
    if not openings:
        return None
    stages: dict[str, str | None] = dict.fromkeys(_STAGES)
    for opening, following in zip(openings, [*openings[1:], None], strict=True):
        name = opening.group(1).lower()
        if stages[name] is not None:
            continue
        body = text[opening.end() : following.start() if following else len(text)]
        closing = re.search(rf"<\s*/\s*{name}\s*>", body, re.IGNORECASE)
        if closing:
            body = body[: closing.start()]
        stages[name] = body.strip() or None
    return CotStages(**stages)


@dataclass(frozen=True)
class Timings:
    """Where the time went: waiting in the queue, batch size, and GPU time of the batch."""

    queued_ms: float
    batch_size: int
    gpu_ms: float


@dataclass(frozen=True)
class AnalysisResult:
    """The result of one ``vlmq.analyze`` task."""

    task_id: str
    answer: str
    stages: CotStages | None
    prompt_tokens: int
    answer_tokens: int
    timings: Timings
    model: str

    @classmethod
    def from_dict(cls, task_id: str, d: Mapping[str, Any]) -> AnalysisResult:
        """Rebuild a result from the dict the worker stored for ``task_id``.

        Raises:
            VlmqError: the dict does not have the shape above (producer and worker versions
                disagree).
        """
        try:
            stages = d["stages"]
            return cls(
                task_id=task_id,
                answer=d["answer"],
                stages=None if stages is None else CotStages(**stages),
                prompt_tokens=d["prompt_tokens"],
                answer_tokens=d["answer_tokens"],
                timings=Timings(**d["timings"]),
                model=d["model"],
            )
        except (KeyError, TypeError) as exc:
            raise VlmqError(
                f"task {task_id} returned a result this producer cannot read ({exc!r}); "
                "are the producer and worker the same vlmq version?"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        """The dict the worker stores as the Celery result: every field but ``task_id``."""
        d = asdict(self)
        del d["task_id"]
        return d
