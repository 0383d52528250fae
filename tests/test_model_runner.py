"""MllamaRunner on the tiny model in fp32: batched results equal each request run alone."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.model.generation import Generation, GenerationRequest
from worker.model.loading import load_model
from worker.model.runner import MllamaRunner, PerRowSampling


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def runner(loaded) -> MllamaRunner:
    return MllamaRunner(*loaded)


def _images() -> list[Image.Image]:
    # Different sizes, so the processor picks different tile grids.
    return [
        Image.new("RGB", (80, 60), (220, 30, 30)),
        Image.linear_gradient("L").resize((40, 150)).convert("RGB"),
        Image.radial_gradient("L").resize((200, 90)).convert("RGB"),
        Image.new("RGB", (30, 30), (20, 40, 230)),
    ]


QUESTIONS = [
    "What is shown?",
    "Describe this image in one sentence, please.",
    "Count the objects.",
    "Hi",
]


def _greedy_alone(runner: MllamaRunner, request: GenerationRequest) -> list[int]:
    """Plain ``model.generate(do_sample=False)`` on this request alone: its new token ids."""
    inputs = runner.prepare([request]).inputs
    with torch.inference_mode():
        output = runner.model.generate(
            **inputs, do_sample=False, max_new_tokens=request.max_new_tokens
        )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _expected(runner: MllamaRunner, ids: list[int]) -> Generation:
    stops = [i for i, token in enumerate(ids) if token in runner.eos_token_ids]
    kept = ids[: stops[0] + 1] if stops else ids
    text = runner.tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Generation(text=text, prompt_tokens=-1, answer_tokens=len(kept))


def _assert_matches(generation: Generation, expected: Generation) -> None:
    assert (generation.text, generation.answer_tokens) == (expected.text, expected.answer_tokens)


def test_prepare_left_pads_and_counts_real_prompt_tokens(runner: MllamaRunner) -> None:
    requests = [
        GenerationRequest(image, q, 4) for image, q in zip(_images(), QUESTIONS, strict=True)
    ]

    batch = runner.prepare(requests)

    inputs = batch.inputs
    assert batch.requests == tuple(requests)
    assert inputs["pixel_values"].shape[:3] == (4, 1, 4)
    assert inputs["cross_attention_mask"].shape[:2] == inputs["input_ids"].shape
    # Left padding: every row ends with its last real token.
    assert inputs["attention_mask"][:, -1].all()
    alone = [runner.prepare([request]).inputs["input_ids"].shape[1] for request in requests]
    assert inputs["attention_mask"].sum(dim=1).tolist() == alone
    assert len(set(alone)) > 1


def test_prepare_refuses_an_empty_batch(runner: MllamaRunner) -> None:
    with pytest.raises(ValueError, match="at least one"):
        runner.prepare([])


def test_images_change_the_output(runner: MllamaRunner) -> None:
    red, gradient = _images()[:2]
    requests = [
        GenerationRequest(red, "What is shown?", 1),
        GenerationRequest(gradient, "What is shown?", 1),
    ]
    inputs = runner.prepare(requests).inputs

    with torch.inference_mode():
        logits = runner.model(**inputs).logits[:, -1]

    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize(
    "temperatures",
    [(0.0, 0.0, 0.0, 0.0), (0.0, 0.9, 0.0, 1.3)],
    ids=["all-greedy", "greedy-and-sampling"],
)
def test_greedy_rows_equal_the_request_run_alone(
    runner: MllamaRunner, temperatures: tuple[float, ...]
) -> None:
    limits = [12, 3, 20, 7]
    requests = [
        GenerationRequest(image, question, limit, temperature=t, top_p=0.9)
        for image, question, limit, t in zip(
            _images(), QUESTIONS, limits, temperatures, strict=True
        )
    ]

    torch.manual_seed(0)
    generations = runner.generate(runner.prepare(requests))

    assert len(generations) == len(requests)
    for request, generation in zip(requests, generations, strict=True):
        assert 1 <= generation.answer_tokens <= request.max_new_tokens
        if request.temperature == 0:
            _assert_matches(generation, _expected(runner, _greedy_alone(runner, request)))


def test_prompt_tokens_are_per_row(runner: MllamaRunner) -> None:
    requests = [
        GenerationRequest(image, q, 2) for image, q in zip(_images(), QUESTIONS, strict=True)
    ]

    generations = runner.generate(runner.prepare(requests))

    for request, generation in zip(requests, generations, strict=True):
        alone = runner.prepare([request]).inputs["input_ids"].shape[1]
        assert generation.prompt_tokens == alone


def test_each_row_stops_at_its_own_eos(
    runner: MllamaRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [
        GenerationRequest(image, q, 10) for image, q in zip(_images(), QUESTIONS, strict=True)
    ]
    alone = [_greedy_alone(runner, request) for request in requests]
    # Make the second token of the first answer a stop token, so rows stop at different steps.
    monkeypatch.setattr(runner, "eos_token_ids", [*runner.eos_token_ids, alone[0][1]])

    generations = runner.generate(runner.prepare(requests))

    assert generations[0].answer_tokens <= 2
    for ids, generation in zip(alone, generations, strict=True):
        _assert_matches(generation, _expected(runner, ids))
    assert len({g.answer_tokens for g in generations}) > 1


def test_sampling_with_a_tiny_top_p_is_greedy(runner: MllamaRunner) -> None:
    image = _images()[2]
    sampled = GenerationRequest(image, "Count the objects.", 9, temperature=1.5, top_p=1e-6)
    greedy = GenerationRequest(image, "Count the objects.", 9)

    (generation,) = runner.generate(runner.prepare([sampled]))

    _assert_matches(generation, _expected(runner, _greedy_alone(runner, greedy)))


def test_sampling_is_seeded_and_varies(runner: MllamaRunner) -> None:
    image = _images()[0]
    requests = [GenerationRequest(image, "What is shown?", 16, temperature=1.0)] * 3

    torch.manual_seed(1)
    first = runner.generate(runner.prepare(requests))
    torch.manual_seed(1)
    second = runner.generate(runner.prepare(requests))

    assert first == second
    assert len({g.text for g in first}) > 1
    assert all(1 <= g.answer_tokens <= 16 for g in first)


def test_per_row_sampling_masks_each_row_as_asked() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    processor = PerRowSampling(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.5, 0.3, 1.0]))

    out = processor(torch.zeros(3, 1, dtype=torch.long), scores.clone())

    # Greedy row: only its argmax survives, whatever its top-p.
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [scores[0].argmax().item()]
    # Sampling row: the smallest top tokens whose probability (at T=0.5) reaches 0.3.
    probs = (scores[1] / 0.5).softmax(dim=-1)
    kept = torch.isfinite(out[1])
    assert probs[kept].sum() >= 0.3
    assert probs[kept].min() >= probs[~kept].max()
    assert torch.allclose(out[1][kept], scores[1][kept] / 0.5)
    # Neutral row: untouched.
    assert torch.equal(out[2], scores[2])


def test_warmup_runs(runner: MllamaRunner) -> None:
    runner.warmup()
