"""GPU probe of the continuous engine on a full-size random Llama-3.2-11B-Vision (bf16).

Checks greedy tokens against HF ``generate`` for two requests, then times decode steps at batch
1/8/32 (whole engine steps and bare graph replays), graph capture and a batched prefill.
Writes JSON to ``$OUT/engine_probe.json``. Run: ``python -m bench.engine_probe``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

from worker.engine import ContinuousEngine
from worker.engine.inputs import prompt_text
from worker.model.runner import GenerationRequest, MllamaRunner
from worker.model.tiny import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, _build_tokenizer

OUT = Path(os.environ.get("OUT", "/tmp/engine_probe"))
RESULTS: dict = {}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# PROBE_MINI=1: the same shapes of inputs with tiny layers, to dry-run this script on a CPU.
MINI = os.environ.get("PROBE_MINI") == "1"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA else 0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "engine_probe.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def phase(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            log(f"-- {name}")
            try:
                return fn(*args, **kwargs)
            except Exception:
                RESULTS.setdefault("errors", {})[name] = traceback.format_exc()
                log(traceback.format_exc())
                return None
            finally:
                RESULTS.setdefault("phase_s", {})[name] = round(time.perf_counter() - start, 2)
                save()

        return run

    return wrap


MINI_TEXT = (
    {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
     "cross_attention_layers": [1, 3], "num_attention_heads": 4, "num_key_value_heads": 2}
    if MINI else {}
)  # fmt: skip
MINI_VISION = (
    {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
     "attention_heads": 2, "intermediate_layers_indices": [0, 1], "vision_output_dim": 96}
    if MINI else {}
)  # fmt: skip


def build_model() -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    tokenizer = _build_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = MllamaConfig(
        vision_config={"image_size": 560, "patch_size": 14, "max_num_tiles": 4, **MINI_VISION},
        text_config={
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [token_id("<|end_of_text|>"), token_id("<|eot_id|>")],
            "pad_token_id": token_id("<|finetune_right_pad_id|>"),
            **MINI_TEXT,
        },
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = MllamaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if CUDA else torch.float32, attn_implementation="sdpa"
        )
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.do_sample = False
    from transformers import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.tokenizer.padding_side = "left"
    return model, processor


def noise(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@phase("hf_reference")
def hf_reference(model, processor, requests):
    out = []
    for request in requests:
        inputs = processor(
            images=[[request.image]],
            text=[prompt_text(processor, request.question)],
            add_special_tokens=False,
            return_tensors="pt",
        ).to(DEVICE)
        start = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=request.max_new_tokens,
                return_dict_in_generate=True,
                output_logits=True,
            )
        sync()
        tokens = gen.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        gaps = []
        for step_logits in gen.logits:
            top = step_logits[0].float().topk(2).values
            gaps.append(round(float(top[0] - top[1]), 4))
        out.append({"tokens": tokens, "top2_gaps": gaps, "s": time.perf_counter() - start})
    RESULTS["hf_reference"] = out
    return out


@phase("hf_generate_batch8")
def hf_batch(model, processor, requests):
    runner = MllamaRunner(model, processor)
    batch = runner.prepare(requests)
    runner.generate(runner.prepare(requests[:2]))  # warm-up
    sync()
    start = time.perf_counter()
    answers = runner.generate(batch)
    sync()
    seconds = time.perf_counter() - start
    steps = max(a.answer_tokens for a in answers)
    RESULTS["hf_generate_batch8"] = {
        "s": round(seconds, 3),
        "new_tokens": steps,
        "ms_per_step_incl_prefill": round(seconds * 1000 / steps, 2),
    }


@phase("engine_init")
def make_engine(model, processor, cuda_graphs: bool = True):
    free_before = free_bytes()
    start = time.perf_counter()
    engine = ContinuousEngine(model, processor, cuda_graphs=cuda_graphs)
    sync()
    RESULTS["engine_init"] = {
        "s": round(time.perf_counter() - start, 2),
        "capture_s": round(engine.graph_capture_s, 2),
        "graphs": len(engine._graphs._graphs),
        "max_slots": engine.max_slots,
        "max_seq_len": engine.max_seq_len,
        "rows_buckets": engine._graphs.rows,
        "length_buckets": engine._graphs.lengths,
        "cache_gib": round(engine.cache.nbytes / 2**30, 2),
        "free_gib_before": round(free_before / 2**30, 2),
        "free_gib_after": round(free_bytes() / 2**30, 2),
    }
    return engine


def drain(engine) -> dict:
    results = {}
    while engine.has_work():
        for done in engine.step_outputs():
            results[done.key] = done
    return results


@phase("engine_greedy")
def engine_greedy(engine, requests, reference):
    for i, request in enumerate(requests):
        engine.submit(f"g{i}", request)
    results = drain(engine)
    report = []
    for i, ref in enumerate(reference):
        got = results[f"g{i}"]
        tokens = got.token_ids if got.error is None else repr(got.error)
        expected = ref["tokens"]
        first_diff = next(
            (j for j, (a, b) in enumerate(zip(tokens, expected, strict=False)) if a != b), None
        )
        report.append({
            "equal": tokens == expected,
            "first_diff": first_diff,
            "hf_top2_gap_at_diff": None if first_diff is None else ref["top2_gaps"][first_diff],
            "engine": tokens,
            "hf": expected,
        })  # fmt: skip
    RESULTS["engine_greedy"] = report


@phase("prefill_8_images")
def prefill_timing(engine, images):
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    before = engine.stats.prefill_ms
    for i, image in enumerate(images):
        engine.submit(f"p{i}", GenerationRequest(image, "Describe this image.", 2))
    engine.step_outputs()
    RESULTS["prefill_8_images"] = {
        "ms": round(engine.stats.prefill_ms - before, 1),
        "peak_extra_gib": round(
            ((torch.cuda.max_memory_allocated() if CUDA else 0) - base) / 2**30, 2
        ),
    }
    drain(engine)


@phase("decode_steps")
def decode_timing(engine, images):
    out = {}
    for batch in (1, 8, 32):
        if batch > engine.max_slots:
            continue
        for i in range(batch):
            request = GenerationRequest(images[i % len(images)], "Describe this image.", 64)
            engine.submit(f"d{batch}-{i}", request)
        while engine.waiting or engine.active < batch:
            engine.step_outputs()
        sync()
        steps = 20
        start = time.perf_counter()
        for _ in range(steps):
            engine.step_outputs()
        seconds = time.perf_counter() - start
        assert engine.active == batch
        out[batch] = round(seconds * 1000 / steps, 2)
        drain(engine)
    RESULTS["engine_step_ms"] = out


@phase("graph_replay")
def replay_timing(engine):
    out = {}
    graphs = engine._graphs
    for rows in (1, 8, 32):
        for length in (256, 1024, 4096):
            if rows > engine.max_slots or length > engine.max_seq_len:
                continue
            graphs.run(rows, length)
            if not CUDA:
                continue
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            for _ in range(20):
                graphs.run(rows, length)
            end_event.record()
            sync()
            out[f"{rows}x{length}"] = round(start_event.elapsed_time(end_event) / 20, 3)
    # The same step without graphs, for comparison.
    for rows in (1, 8, 32):
        if rows > engine.max_slots:
            continue
        graphs.step(rows, 256)
        sync()
        start = time.perf_counter()
        for _ in range(5):
            graphs.step(rows, 256)
        sync()
        out[f"eager_{rows}x256"] = round((time.perf_counter() - start) * 1000 / 5, 3)
    RESULTS["graph_replay_ms"] = out


def main() -> int:
    RESULTS["env"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "gpu": torch.cuda.get_device_name() if CUDA else "cpu",
    }
    log(str(RESULTS["env"]))
    start = time.perf_counter()
    model, processor = build_model()
    sync()
    RESULTS["build_s"] = round(time.perf_counter() - start, 1)
    RESULTS["weights_gib"] = round(allocated() / 2**30, 2)
    log(f"model built in {RESULTS['build_s']} s, {RESULTS['weights_gib']} GiB")
    save()

    four_tiles = noise(1, (1100, 1000))
    one_tile = noise(2, (500, 480))
    greedy = [
        GenerationRequest(four_tiles, "What is shown in the picture? Answer briefly.", 16),
        GenerationRequest(one_tile, "Describe this image in one sentence.", 16),
    ]
    with torch.inference_mode():
        reference = hf_reference(model, processor, greedy)
        images = [noise(10 + i, (900 + 10 * i, 800)) for i in range(8)]
        hf_batch(model, processor, [GenerationRequest(im, "Describe.", 32) for im in images])
    if CUDA:
        torch.cuda.empty_cache()
    engine = make_engine(model, processor)
    if engine is None:
        import gc

        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        log("engine with graphs failed: trying without")
        engine = make_engine(model, processor, cuda_graphs=False)
        if engine is None:
            return 1
    if reference:
        engine_greedy(engine, greedy, reference)
    for step in (
        lambda: prefill_timing(engine, images),
        lambda: decode_timing(engine, images[:4]),
        lambda: replay_timing(engine),
    ):
        if time.perf_counter() - start > 270:
            log("out of time: skipping the remaining phases")
            break
        with torch.inference_mode():
            step()
    RESULTS["stats"] = vars(engine.stats)
    save()
    log(json.dumps({k: v for k, v in RESULTS.items() if k != "hf_reference"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
