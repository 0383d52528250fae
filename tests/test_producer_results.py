"""LLaVA-CoT parsing and the result dict the worker stores."""

import dataclasses
import json

import pytest

from producer.errors import VlmqError
from producer.results import AnalysisResult, CotStages, Timings, parse_cot


def test_complete_answer() -> None:
    text = (
        "<SUMMARY>I will count the cats.</SUMMARY>\n"
        "<CAPTION>Two cats on a sofa.</CAPTION>\n"
        "<REASONING>One is black, one is white.</REASONING>\n"
        "<CONCLUSION>There are 2 cats.</CONCLUSION>"
    )
    assert parse_cot(text) == CotStages(
        summary="I will count the cats.",
        caption="Two cats on a sofa.",
        reasoning="One is black, one is white.",
        conclusion="There are 2 cats.",
    )


def test_case_and_whitespace_are_tolerated() -> None:
    text = "  < summary >\n  plan \n</Summary >< Conclusion>\n\n 2 \n</ CONCLUSION>"
    assert parse_cot(text) == CotStages("plan", None, None, "2")


def test_missing_tags_are_none() -> None:
    assert parse_cot("<CAPTION>a dog</CAPTION><CONCLUSION>dog</CONCLUSION>") == CotStages(
        None, "a dog", None, "dog"
    )


def test_cut_off_at_max_new_tokens() -> None:
    text = "<SUMMARY>plan</SUMMARY><CAPTION>a red car<REASONING>it is parked and"
    assert parse_cot(text) == CotStages("plan", "a red car", "it is parked and", None)


def test_unclosed_stage_stops_at_next_opening_tag() -> None:
    text = "<SUMMARY>plan<CONCLUSION>yes</CONCLUSION>"
    assert parse_cot(text) == CotStages("plan", None, None, "yes")


def test_empty_stage_and_repeated_stage() -> None:
    text = "<SUMMARY></SUMMARY><CAPTION>first</CAPTION><CAPTION>second</CAPTION>"
    assert parse_cot(text) == CotStages(None, "first", None, None)


@pytest.mark.parametrize("text", ["", "Two cats.", "<b>bold</b>", "</SUMMARY> only closing"])
def test_no_stage_tag_gives_none(text: str) -> None:
    assert parse_cot(text) is None


def result() -> AnalysisResult:
    return AnalysisResult(
        task_id="t-1",
        answer="There are 2 cats.",
        stages=CotStages("s", "c", "r", "There are 2 cats."),
        prompt_tokens=1600,
        answer_tokens=42,
        timings=Timings(queued_ms=12.5, batch_size=4, gpu_ms=340.0),
        model="meta-llama/Llama-3.2-11B-Vision-Instruct",
    )


def test_to_dict_is_the_stored_shape() -> None:
    stored = result().to_dict()
    assert stored == {
        "answer": "There are 2 cats.",
        "stages": {
            "summary": "s",
            "caption": "c",
            "reasoning": "r",
            "conclusion": "There are 2 cats.",
        },
        "prompt_tokens": 1600,
        "answer_tokens": 42,
        "timings": {"queued_ms": 12.5, "batch_size": 4, "gpu_ms": 340.0},
        "model": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    }
    without_id = dataclasses.asdict(result())
    del without_id["task_id"]
    assert stored == without_id


def test_from_dict_round_trips_through_json() -> None:
    wire = json.loads(json.dumps(result().to_dict()))
    assert AnalysisResult.from_dict("t-1", wire) == result()


def test_from_dict_without_stages() -> None:
    wire = {**result().to_dict(), "stages": None}
    assert AnalysisResult.from_dict("t-1", wire).stages is None


@pytest.mark.parametrize(
    "wire",
    [
        {},
        {**result().to_dict(), "timings": {"queued_ms": 1.0}},
        {**result().to_dict(), "stages": {"summary": "only"}},
        {**result().to_dict(), "timings": None},
    ],
)
def test_malformed_result_dict(wire: dict) -> None:
    with pytest.raises(VlmqError, match="t-9"):
        AnalysisResult.from_dict("t-9", wire)
